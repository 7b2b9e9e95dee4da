"""One training loop for pre-training a CLIP from scratch and for cleaning a checkpoint.

The objective (``clip``/``ft``, ``par``, ``cleanclip``; see ``par.objectives``) is the only
thing that differs between pre-training, plain fine-tuning, PAR and CleanCLIP. The loop
runs single-process (CPU or one GPU) or distributed under ``torchrun`` / SLURM
(``torch.distributed``, set up by open_clip_train's helper): the trainable model is
wrapped in DDP and every forward goes through the wrapper, the contrastive loss gathers
the global batch, a ``DistributedSampler`` reshuffles every epoch, and only rank 0 logs
and writes. Read ``train`` top to bottom: setup, data, optimiser, loop, checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from par.config import dump
from par.errors import ParError

COSMETIC = ("out", "progress", "log_every", "workers", "threads", "preload", "device", "save_every",
            "eval_every", "eval_csv", "eval_classnames", "eval_templates", "eval_image_root", "eval_attack",
            "eval_label", "eval_attack_params", "eval_max_images", "tensorboard", "compile")


@dataclass
class TrainConfig:
    model: str
    train_csv: str
    out: str
    image_root: Optional[str] = None
    init_checkpoint: Optional[str] = None  # None: random init (pre-training from scratch)
    objective: str = "clip"  # clip (alias ft) | par | cleanclip
    tau: float = 2.15  # PAR's threshold on the mean squared embedding distance
    cleanclip_lambda: float = 1.0  # weight of CleanCLIP's unimodal terms
    augment: str = "none"  # none | par
    train_logit_scale: bool = True  # PAR treats the temperature as a constant: false when cleaning
    steps: int = 1000
    batch_size: int = 128  # global batch per optimiser step, over all processes
    accum_steps: int = 1  # micro-batches per step; the contrastive loss is per micro-batch
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    precision: str = "fp32"  # fp32 | amp (fp16 + loss scaling) | amp_bf16
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    workers: int = 0  # DataLoader workers (decoding) when not preloading
    preload: bool = True  # decode every image once into memory (small datasets)
    log_every: int = 10
    save_every: int = 0  # steps between resumable states (0: none); the latest is kept
    eval_every: int = 0  # steps between live CA/ASR measurements (0: none)
    eval_csv: Optional[str] = None  # image,label CSV or class-folder tree for live evaluation
    eval_classnames: Optional[str] = None
    eval_templates: str = "openai"
    eval_image_root: Optional[str] = None
    eval_attack: Optional[str] = None
    eval_label: Optional[str] = None
    eval_attack_params: dict = field(default_factory=dict)
    eval_max_images: int = 512
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    progress: bool = True


PRECISIONS = ("fp32", "amp", "amp_bf16")


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainConfig) -> dict:
    """What makes two runs the same: the config (minus cosmetics) and the digests of its inputs."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in COSMETIC}
    values["train_csv_digest"] = file_digest(cfg.train_csv)
    if cfg.init_checkpoint:
        values["init_checkpoint_digest"] = file_digest(cfg.init_checkpoint)
    return values


def validate(cfg: TrainConfig) -> None:
    from par.augment import AUGMENTATIONS
    from par.models import canonical_model_name
    from par.objectives import OBJECTIVES

    canonical_model_name(cfg.model)
    AUGMENTATIONS.get(cfg.augment)
    if OBJECTIVES.get(cfg.objective).needs_frozen and not cfg.init_checkpoint:
        raise ParError(f"objective {cfg.objective!r} cleans a checkpoint: set init_checkpoint")
    for name in ("steps", "batch_size", "accum_steps"):
        if getattr(cfg, name) < 1:
            raise ParError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup >= cfg.steps:
        raise ParError(f"warmup ({cfg.warmup}) must be shorter than steps ({cfg.steps})")
    if cfg.precision not in PRECISIONS:
        raise ParError(f"unknown precision {cfg.precision!r}; known: {', '.join(PRECISIONS)}")
    if cfg.eval_every and not (cfg.eval_csv and cfg.eval_classnames):
        raise ParError("eval_every needs eval_csv and eval_classnames")
    if cfg.eval_attack and not cfg.eval_label:
        raise ParError("eval_attack needs eval_label")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParError(f"device {name!r} requested but CUDA is not available")
    return device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes (detached)."""
        value = value.detach().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value


def setup_distributed(cfg: TrainConfig):
    """(Dist, device): torchrun/SLURM environments are read by open_clip_train's helper."""
    from open_clip_train.distributed import init_distributed_device_so, is_using_distributed

    device = pick_device(cfg.device)  # an unavailable device is an error here, never a fallback
    if not is_using_distributed():
        return Dist(), device
    info = init_distributed_device_so(device=device.type)
    return Dist(info["global_rank"], info["world_size"], info["local_rank"]), torch.device(info["device"])


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases, norms, the temperature and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "bias" in name or "ln_" in name or ".bn" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "amp_bf16" else torch.float16)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """A ``DistributedSampler`` that can start part-way into an epoch (for resuming)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def _diff(a: dict, b: dict) -> list:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def prepare_run(cfg: TrainConfig, dist: Dist, reuse: bool, resume: Optional[str]):
    """Checks the run folder (all ranks), then creates it (rank 0).

    Returns ("finished", checkpoint) for a reusable identical run, ("resume", state path),
    or ("new", None). A finished run is never overwritten, and a folder made with other
    settings is never resumed or reused.
    """
    out = Path(cfg.out)
    done, record, state = out / "checkpoint.pt", out / "fingerprint.json", out / "state-latest.pt"
    fp = fingerprint(cfg)
    old = json.loads(record.read_text()) if record.exists() else None
    if old is not None and old != fp and (reuse or resume):
        raise ParError(f"run folder {out} was made with other settings (differs in {_diff(fp, old)}); choose another out")
    if resume:
        path = state if resume == "latest" else Path(resume)
        if done.exists():
            raise ParError(f"run folder {out} already holds a finished run; nothing to resume")
        if not path.exists():
            raise ParError(f"no state to resume from: {path} not found (was save_every set?)")
        return "resume", path
    if done.exists():
        if reuse:
            return "finished", done
        raise ParError(f"run folder {out} already holds a finished run; choose another out (or pass --reuse)")
    if state.exists():
        raise ParError(f"run folder {out} holds an unfinished run; continue it with --resume latest or choose another out")
    dist.barrier()  # every rank has checked before rank 0 writes
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump(cfg))
        record.write_text(json.dumps(fp, indent=2) + "\n")
    return "new", None


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(aug_rng: torch.Generator, objective) -> dict:
    state = {"torch": torch.get_rng_state(), "augment": aug_rng.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(objective, "rng"):
        state["objective"] = objective.rng.getstate()
    return state


def _set_rng_state(state: dict, aug_rng: torch.Generator, objective) -> None:
    torch.set_rng_state(state["torch"])
    aug_rng.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "objective" in state:
        objective.rng.setstate(_as_tuple(state["objective"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class LiveEval:
    """CA/ASR on a held-out subset, through the eval transform (never the training augmentation)."""

    def __init__(self, cfg: TrainConfig, image_size: int, device):
        from par.data import labelled_dataset, load_classnames, preload
        from par.evaluate import load_templates

        self.classnames = load_classnames(cfg.eval_classnames)
        self.templates = load_templates(cfg.eval_templates)
        dataset = labelled_dataset(cfg.eval_csv, self.classnames, image_size, cfg.eval_image_root)
        subset = torch.utils.data.Subset(dataset, range(min(cfg.eval_max_images, len(dataset))))
        self.data = preload(subset, desc="decode eval images", progress=cfg.progress)
        self.trigger, self.target = None, None
        if cfg.eval_attack:
            from par.triggers import get_trigger

            if cfg.eval_label not in self.classnames:
                raise ParError(f"eval_label {cfg.eval_label!r} is not a class in {cfg.eval_classnames}")
            self.trigger = get_trigger(cfg.eval_attack, **cfg.eval_attack_params)
            self.target = self.classnames.index(cfg.eval_label)
        self.device = device

    def __call__(self, model, tokenizer, mean, std) -> dict:
        from par.evaluate import attack_success_rate, clean_accuracy, predict, zero_shot_classifier

        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(self.data, batch_size=256)
        classifier = zero_shot_classifier(model, tokenizer, self.classnames, self.templates, self.device)
        top, labels = predict(model, classifier, loader, mean, std, self.device, progress=False)
        result = {"ca": clean_accuracy(top, labels)}
        if self.trigger is not None:
            top, labels = predict(model, classifier, loader, mean, std, self.device, self.trigger, progress=False)
            result["asr"] = attack_success_rate(top, labels, self.target)
        model.train(was_training)
        return result


def replica_drift(model: torch.nn.Module) -> float:
    """Largest difference between ranks of per-tensor parameter checksums: 0 when DDP kept them in sync."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()] +
                       [p.detach().double().abs().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def _tensorboard(cfg: TrainConfig, out: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig, reuse: bool = False, resume: Optional[str] = None) -> Path:
    """Runs the training described by ``cfg`` and returns the path of the final checkpoint."""
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from par import models
    from par.augment import AUGMENTATIONS
    from par.data import ImageCaptionDataset, preload, to_float
    from par.objectives import OBJECTIVES, Batch

    # ---- setup: validation, processes, run folder
    validate(cfg)
    dist, device = setup_distributed(cfg)
    if cfg.batch_size % (dist.world_size * cfg.accum_steps):
        raise ParError(f"batch_size {cfg.batch_size} is not divisible by world size {dist.world_size} "
                       f"x accum_steps {cfg.accum_steps}")
    status, found = prepare_run(cfg, dist, reuse, resume)
    if status == "finished":
        print(f"reusing {found} (same settings and inputs)")
        return found
    out = Path(cfg.out)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + dist.rank)
    augment = AUGMENTATIONS.get(cfg.augment)

    # ---- model (DDP-wrapped when distributed), and for PAR the frozen poisoned copy (never wrapped)
    model = models.create_model(cfg.model)
    if cfg.init_checkpoint:
        models.load_weights(model, cfg.init_checkpoint)
    model.logit_scale.requires_grad_(cfg.train_logit_scale)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device).train()
    objective_cls = OBJECTIVES.get(cfg.objective)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if objective_cls.needs_frozen else None
    raw_model = model
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    mean, std = models.image_mean_std(raw_model)
    tokenizer = models.get_tokenizer(cfg.model)
    contrastive = ClipLoss(gather_with_grad=True, rank=dist.rank, world_size=dist.world_size)
    objective = objective_cls(cfg, contrastive, frozen=frozen, tokenizer=tokenizer, mean=mean, std=std,
                              seed=cfg.seed + dist.rank, dist=dist)

    # ---- data: uint8 images, token ids and row indices; a distributed sampler reshuffles every epoch
    dataset = ImageCaptionDataset(cfg.train_csv, tokenizer, models.image_size(raw_model), cfg.image_root)
    captions = dataset.captions
    if len(dataset) < cfg.batch_size:
        raise ParError(f"{cfg.train_csv} has {len(dataset)} rows, fewer than one batch of {cfg.batch_size}")
    if cfg.preload:
        dataset = preload(dataset, workers=cfg.workers, desc="decode train images", progress=cfg.progress and dist.main)
    local_batch = cfg.batch_size // dist.world_size
    sampler = ResumableSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                               seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
        num_workers=0 if cfg.preload else cfg.workers, pin_memory=device.type == "cuda",
    )
    aug_rng = torch.Generator().manual_seed(cfg.seed + 1 + dist.rank)
    live_eval = LiveEval(cfg, models.image_size(raw_model), device) if cfg.eval_every and dist.main else None

    # ---- optimiser, schedule, loss scaling
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    schedule = cosine_lr(optimizer, cfg.lr, cfg.warmup, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp")

    # ---- resume: weights, optimiser, scaler, data position and random streams
    step, epoch, skip = 0, 0, 0
    if status == "resume":
        state = torch.load(found, map_location="cpu", weights_only=True)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, skip = state["step"], state["epoch"], state["batches_done"]
        if len(state["rng"]) != dist.world_size:
            raise ParError(f"{found} was saved by {len(state['rng'])} process(es); resume it with as many, "
                           f"not {dist.world_size}")
        _set_rng_state(state["rng"][dist.rank], aug_rng, objective)
        if dist.main:
            print(f"resuming {out} at step {step}")

    # ---- loop
    log = None
    if dist.main:
        kept = []
        if status == "resume" and (out / "metrics.jsonl").exists():
            kept = [l for l in (out / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= step]
        log = open(out / "metrics.jsonl", "w")
        log.writelines(line + "\n" for line in kept)
    board = _tensorboard(cfg, out) if dist.main else None
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train ({cfg.objective})", unit="step",
               disable=not (cfg.progress and dist.main))
    start, seen, first_step = time.time(), 0, step
    while step < cfg.steps:
        sampler.set_epoch(epoch)
        sampler.skip = skip * local_batch
        batches_done = skip
        for raw_images, tokens, rows in loader:
            lr = schedule(step)
            raw_images = raw_images.to(device, non_blocking=True)
            images = augment(to_float(raw_images), mean, std, generator=aug_rng)
            tokens = tokens.to(device, non_blocking=True)
            micro = local_batch // cfg.accum_steps
            optimizer.zero_grad(set_to_none=True)
            totals = {}
            for k in range(cfg.accum_steps):
                part = slice(k * micro, (k + 1) * micro)
                batch = Batch(images=images[part], tokens=tokens[part], raw_images=raw_images[part],
                              captions=[captions[i] for i in rows[part].tolist()])
                sync = k == cfg.accum_steps - 1 or dist.world_size == 1
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast(cfg.precision, device):
                    terms = objective(model, batch)
                if not torch.isfinite(terms["loss"]):
                    kept_state = out / "state-latest.pt"
                    where = f"; the last good state is {kept_state}" if kept_state.exists() else ""
                    raise ParError(f"loss became {terms['loss'].item()} at step {step}; lower lr (now {cfg.lr}) "
                                   f"or check the data{where}")
                scaler.scale(terms["loss"] / cfg.accum_steps).backward()
                for name, value in terms.items():
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / cfg.accum_steps
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                raw_model.logit_scale.clamp_(0, math.log(100))
            step += 1
            batches_done += 1
            seen += cfg.batch_size
            bar.update(1)

            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                # one file, written atomically, holds everything, the random streams of every rank included,
                # so a kill at any moment leaves a consistent state behind
                rng = [_rng_state(aug_rng, objective)]
                if dist.world_size > 1:
                    gathered = [None] * dist.world_size if dist.main else None
                    torch.distributed.gather_object(rng[0], gathered, dst=0)
                    rng = gathered
                if dist.main:
                    _atomic_save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                                  "batches_done": batches_done, "rng": rng}, out / "state-latest.pt")
            if step % cfg.log_every == 0 or step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                record = {"step": step, "epoch": epoch, "lr": lr, "logit_scale": raw_model.logit_scale.exp().item(),
                          **{k: dist.mean(v).item() for k, v in totals.items()}}
                if live_eval is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                    record.update(live_eval(raw_model, tokenizer, mean, std))
                record.update(samples_per_s=seen / (time.time() - start), elapsed_s=time.time() - start)
                if dist.main:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if board is not None:
                        for key, value in record.items():
                            if key != "step":
                                board.add_scalar(key, value, step)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step >= cfg.steps:
                break
        epoch += 1
        skip = 0
    bar.close()

    # ---- final checkpoint and plot (rank 0)
    checkpoint = out / "checkpoint.pt"
    if dist.world_size > 1:
        drift = replica_drift(raw_model)
        if dist.main:
            (out / "distributed.json").write_text(json.dumps({"world_size": dist.world_size, "replica_drift": drift}) + "\n")
        if drift > 1e-6:
            raise RuntimeError(f"model replicas diverged across ranks (max checksum difference {drift:.3g})")
    if dist.main:
        log.close()
        if board is not None:
            board.close()
        models.save_checkpoint(raw_model, checkpoint, {"step": step, "objective": cfg.objective,
                                                       "config": dataclasses.asdict(cfg)})
        from par.plots import plot_training

        plot_training(out / "metrics.jsonl", out / "training.png", tau=cfg.tau if cfg.objective == "par" else None)
        print(f"wrote {checkpoint} ({step - first_step} steps in {time.time() - start:.0f} s)")
    if dist.world_size > 1:
        dist.barrier()
        torch.distributed.destroy_process_group()
    return checkpoint
