"""One training loop for pre-training a CLIP from scratch and for cleaning a checkpoint.

The objective (``par.defenses``: ``clip``/``ft``, ``par``, ``cleanclip``, or a plugin's) is the
only thing that differs between pre-training, plain fine-tuning, PAR and CleanCLIP, and the
loop knows nothing about any of them. It runs single-process (CPU or one GPU) or distributed
under ``torchrun`` / SLURM (``torch.distributed``, set up by open_clip_train's helper): the
trainable model is wrapped in DDP and every forward goes through the wrapper, the contrastive
loss gathers the global batch, a ``DistributedSampler`` reshuffles every epoch, and only rank 0
logs and writes. Read ``train`` top to bottom: setup, the step, data, resume, loop, checkpoint.
Everything one optimiser step does is one ``Step`` object (``make_step``), the one
``scripts/train_throughput.py`` times; what a resumable state holds is written and read back by
``save_resumable`` / ``restore_resumable``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from par import models
from par.augment import AUGMENTATIONS
from par.config import build
from par.data import PairLoader, caption_dataset, preload, to_float
from par.distributed import Dist, replica_drift, setup_distributed
from par.errors import ParError
from par.eval.zeroshot import LiveEval
from par.defenses.base import OBJECTIVES, Batch, Objective, TaskContext, make_objective, objective_params
from par.plots import plot_training
from par.shards import ShardLoader, ShardPairs, expand, is_shard_pattern
from par.runs import MetricsLog, RunFolder, fingerprint, load_state, rng_state, save_state, set_rng_state
from par.utils import PRECISIONS, autocast, check_output_dir, restores_torch_threads

# settings that do not change what a run computes (where it runs, how it reports): left out of its fingerprint.
# One caveat: ``preload``'s decoding pass draws a loader seed from torch's global stream before the first step, so
# the draws made from that stream (torchvision's AutoAugment, CleanCLIP's and RoCLIP's views) differ from a run
# without it: other draws of the same distribution, not another computation.
NOT_FINGERPRINTED = ("out", "progress", "log_every", "workers", "threads", "preload", "device", "save_every",
            "eval_every", "eval_csv", "eval_classnames", "eval_templates", "eval_image_root", "eval_attack",
            "eval_label", "eval_attack_params", "eval_max_images", "tensorboard", "compile")


def cosmetic_settings(cfg: "TrainConfig") -> tuple:
    """``NOT_FINGERPRINTED`` for ``cfg``: with shards, each loader worker reads every ``workers``-th shard through
    its own shuffle, so the number of workers decides the batches and is part of what the run computes."""
    if is_shard_pattern(cfg.train_data):
        return tuple(k for k in NOT_FINGERPRINTED if k != "workers")
    return NOT_FINGERPRINTED


MOVED = {"tau": "objective_params.tau", "train_logit_scale": "objective_params.train_logit_scale",
         "cleanclip_lambda": "objective_params.unimodal_weight"}  # keys that belong to an objective now
INPUTS = ("train_data", "init_checkpoint")  # files known by their digest in a run's fingerprint


@dataclass
class TrainConfig:
    model: str
    train_data: str  # image,caption CSV; a class-folder tree (captioned "a photo of a {class}.", labels kept);
    # or webdataset shards "shards/{00000..00099}.tar" (python -m par shards; open_clip's --train-data convention)
    out: str
    image_root: Optional[str] = None
    train_classnames: Optional[str] = None  # a class-folder tree's class names: file or "imagenet" (default: folder names)
    init_checkpoint: Optional[str] = None  # None: random init (pre-training from scratch)
    objective: str = "clip"  # clip (alias ft) | par | cleanclip | a plugin's
    objective_params: dict = field(default_factory=dict)  # the objective's own settings (its Params), e.g. {tau: 2.15}
    augment: str = "none"  # none | par
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
    threads: int = 0  # torch CPU threads during the run (the caller's count is restored after it); 0 keeps it
    workers: int = 0  # DataLoader workers (decoding) when not preloading
    preload: bool = False  # decode every image once into memory: small datasets only (the synthetic world's stages)
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


def train_config(values: dict, source: str = "train config") -> TrainConfig:
    """A ``TrainConfig`` from a mapping; keys that moved into ``objective_params`` get a pointed error."""

    moved = sorted(k for k in values if k in MOVED)
    if moved:
        hints = ", ".join(f"{k} -> {MOVED[k]}" for k in moved)
        raise ParError(f"{source}: key(s) {moved} belong to the objective now; use {hints}")
    return build(TrainConfig, values, source)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate(cfg: TrainConfig) -> None:
    """Every setting checked in one place, before any work (``train`` calls it before a folder is made,
    defenses' ``check`` before a benchmark starts): each problem is one ParError naming the key and value."""
    for name, least in (("steps", 1), ("batch_size", 1), ("accum_steps", 1), ("log_every", 1),
                        ("eval_max_images", 1), ("warmup", 0), ("workers", 0), ("threads", 0), ("save_every", 0),
                        ("eval_every", 0)):
        if getattr(cfg, name) < least:
            raise ParError(f"{name} must be at least {least}, got {getattr(cfg, name)}")
    for name, positive in (("lr", True), ("eps", True), ("weight_decay", False)):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ParError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ParError(f"betas must be a pair of numbers in [0, 1), got {cfg.betas}")
    if not DEVICE.fullmatch(cfg.device):
        raise ParError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.warmup >= cfg.steps:
        raise ParError(f"warmup ({cfg.warmup}) must be shorter than steps ({cfg.steps})")
    if cfg.precision not in PRECISIONS:
        raise ParError(f"unknown precision {cfg.precision!r}; known: {', '.join(PRECISIONS)}")
    models.canonical_model_name(cfg.model)
    AUGMENTATIONS.get(cfg.augment)
    objective_params(cfg.objective, cfg.objective_params)  # unknown, mistyped or senseless objective settings
    if OBJECTIVES.get(cfg.objective).needs_frozen and not cfg.init_checkpoint:
        raise ParError(f"objective {cfg.objective!r} cleans a checkpoint: set init_checkpoint")
    if cfg.eval_every and not (cfg.eval_csv and cfg.eval_classnames):
        raise ParError("eval_every needs eval_csv and eval_classnames")
    if is_shard_pattern(cfg.train_data):
        expand(cfg.train_data)  # a pattern that matches nothing fails before the run folder is made
    if cfg.eval_attack and not cfg.eval_label:
        raise ParError("eval_attack needs eval_label")
    check_output_dir(cfg.out, "run folder")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups of the parameters that train: no weight decay on biases, norms, the temperature
    and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "bias" in name or "ln_" in name or ".bn" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: TrainConfig, dist: Dist, device: torch.device):
    """(raw model, model to call, objective, tokenizer): the objective picks what trains and copies
    what it keeps frozen before DDP wraps the trainable model."""
    from open_clip import ClipLoss

    model = models.create_model(cfg.model)
    if cfg.init_checkpoint:
        models.load_weights(model, cfg.init_checkpoint)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.to(device).train()
    tokenizer = models.get_tokenizer(cfg.model)
    mean, std = models.image_mean_std(model)
    context = TaskContext(ClipLoss(gather_with_grad=True, rank=dist.rank, world_size=dist.world_size),
                          tokenizer, mean, std, seed=cfg.seed + dist.rank,
                          reduce_mean=dist.mean if dist.world_size > 1 else None,
                          gather=dist.gather if dist.world_size > 1 else None)
    objective = make_objective(cfg.objective, cfg.objective_params, model, context)
    wrapped = objective.step_module(model)
    if dist.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return model, wrapped, objective, tokenizer


def build_data(cfg: TrainConfig, dist: Dist, device: torch.device, tokenizer, size: int):
    """This rank's batches, ``data.epoch(e, skip)`` -> ``(uint8 images, token ids, captions, labels
    or None)``: from webdataset shards (``train_data`` a ``.tar`` pattern), else from a CSV or a
    class-folder tree (decoded once into memory when ``preload``)."""
    needs_labels = OBJECTIVES.get(cfg.objective).needs_labels
    local_batch, pin = cfg.batch_size // dist.world_size, device.type == "cuda"
    if is_shard_pattern(cfg.train_data):
        stream = ShardPairs(cfg.train_data, tokenizer, size, dist.rank, dist.world_size, cfg.seed,
                            needs_labels=needs_labels)
        return ShardLoader(stream, local_batch, cfg.batch_size, cfg.workers, pin)
    dataset = caption_dataset(cfg.train_data, tokenizer, size, cfg.image_root, cfg.train_classnames)
    captions, labels = dataset.captions, dataset.labels
    if labels is None and needs_labels:
        raise ParError(f"objective {cfg.objective!r} trains on class labels: give a class-folder tree as train_data, "
                       f"or a CSV with a 'label' column ({cfg.train_data} has neither)")
    if len(dataset) < cfg.batch_size:
        raise ParError(f"{cfg.train_data} has {len(dataset)} rows, fewer than one batch of {cfg.batch_size}")
    if cfg.preload:
        dataset = preload(dataset, workers=cfg.workers, desc="decode train images", progress=cfg.progress and dist.main)
    return PairLoader(dataset, captions, labels, local_batch, dist.rank, dist.world_size, cfg.seed,
                      0 if cfg.preload else cfg.workers, pin)


def live_eval(cfg: TrainConfig, size: int, device: torch.device) -> LiveEval:
    return LiveEval(cfg.eval_csv, cfg.eval_classnames, size, device, cfg.eval_templates, cfg.eval_image_root,
                    cfg.eval_attack, cfg.eval_label, cfg.eval_attack_params, cfg.eval_max_images,
                    progress=cfg.progress)


@restores_torch_threads
def train(cfg: TrainConfig, reuse: bool = False, resume: Optional[str] = None) -> Path:
    """Runs the training described by ``cfg`` and returns the path of the final checkpoint."""
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    # ---- setup: settings, processes, run folder
    validate(cfg)
    dist, device = setup_distributed(cfg.device)
    if cfg.batch_size % (dist.world_size * cfg.accum_steps):
        raise ParError(f"batch_size {cfg.batch_size} is not divisible by world size {dist.world_size} "
                       f"x accum_steps {cfg.accum_steps}")
    run = RunFolder(cfg.out, fingerprint(cfg, cosmetic_settings(cfg), INPUTS), dist, reuse, resume, cfg)
    if run.status == "finished":
        print(f"reusing {run.found} (same settings and inputs)")
        return run.found
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    # ---- the step (model, objective, optimiser, augmentation), data, schedule, live evaluation
    one_step = make_step(cfg, dist, device)
    model, ctx, size = one_step.model, one_step.objective.context, models.image_size(one_step.model)
    data = build_data(cfg, dist, device, ctx.tokenizer, size)
    evaluator = live_eval(cfg, size, device) if cfg.eval_every and dist.main else None
    schedule = cosine_lr(one_step.optimizer, cfg.lr, cfg.warmup, cfg.steps)
    run.claim()  # the data and the initial weights are usable: the folder is this run's from here on

    # ---- resume: weights, optimiser, loss scale, data position and random streams
    step, epoch, skip, before = 0, 0, 0, 0.0  # before: seconds the resumed state had trained for
    if run.status == "resume":
        step, epoch, skip, before = restore_resumable(run.found, one_step, dist)
        if dist.main:
            print(f"resuming {run.out} at step {step}")

    # ---- loop
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train ({cfg.objective})", unit="step",
               disable=not (cfg.progress and dist.main))
    start, seen, first_step = time.time(), 0, step
    with MetricsLog(run.metrics, dist.main, from_step=step, history=run.history, tensorboard=cfg.tensorboard) as log:
        while step < cfg.steps:
            one_step.objective.on_epoch_start(epoch)
            batches_done = skip
            for batch in epoch_batches(data, epoch, skip):
                lr = schedule(step)
                terms = one_step(batch, step)
                step, batches_done, seen = step + 1, batches_done + 1, seen + cfg.batch_size
                bar.update(1)

                if step % cfg.log_every == 0 or step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                    one_step.finite.check(run.state, dist, step)
                    record = {"step": step, "epoch": epoch, "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                              **{k: dist.mean(v).item() for k, v in terms.items()}}
                    if evaluator is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                        record.update(evaluator(model, ctx.tokenizer, ctx.mean, ctx.std))
                    record.update(samples_per_s=seen / (time.time() - start), elapsed_s=before + time.time() - start)
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save_resumable(run, one_step, {"step": step, "epoch": epoch, "batches_done": batches_done,
                                                   "elapsed_s": before + time.time() - start}, dist)
                if step >= cfg.steps:
                    break
            epoch, skip = epoch + 1, 0
    bar.close()
    one_step.finite.check(run.state, dist, step)
    return finish(cfg, run, dist, model, one_step.objective, step, time.time() - start, step - first_step)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused into one kernel per step on CUDA and on the CPU (on the CPU it is
    ~8x faster than the per-tensor loop: par-tiny-vit's 4.7M-entry token embedding is most of what it updates)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu"))


@dataclass(eq=False)
class Step:
    """One optimiser step on one loader batch, all of it: the batch onto the device and augmented there,
    the objective's forward and backward over ``accum_steps`` micro-batches, the optimiser and loss-scaler
    step, the objective's ``after_step`` hook and the watch for a non-finite loss. ``make_step`` builds it
    from the config for the training loop and for ``scripts/train_throughput.py``, so what is timed is what
    trains. A call returns the objective's terms averaged over the micro-batches, as device tensors:
    nothing in it waits for the GPU."""

    model: torch.nn.Module  # the CLIP model: what is saved, evaluated and clamped
    wrapped: torch.nn.Module  # what the objective calls: its step_module of the model, in DDP / compile wrappers
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: Callable
    generator: torch.Generator  # the augmentation's draws, made on the device
    precision: str
    accum_steps: int
    device: torch.device
    ddp: bool
    finite: FiniteWatch

    def on_device(self, loader_batch) -> Batch:
        """A loader's ``(uint8 images, token ids, captions, labels or None)`` on the device, its images
        augmented and normalised there."""
        raw_images, tokens, captions, labels = loader_batch
        ctx = self.objective.context
        raw_images = raw_images.to(self.device, non_blocking=True)
        images = self.augment(to_float(raw_images), ctx.mean, ctx.std, generator=self.generator)
        labels = None if labels is None else labels.to(self.device, non_blocking=True)
        return Batch(images, tokens.to(self.device, non_blocking=True), raw_images, captions, labels)

    def __call__(self, loader_batch, step: int) -> dict:
        try:
            return self._step(loader_batch, step)
        except torch.cuda.OutOfMemoryError:  # the batch is the user's setting: say which knobs hold it
            micro = len(loader_batch[0]) // self.accum_steps
            raise ParError(f"out of GPU memory at {micro} pairs per forward pass ({len(loader_batch[0])} per process, "
                           f"accum_steps {self.accum_steps}, precision {self.precision}): raise accum_steps (the same "
                           "global batch in smaller passes), or use precision amp_bf16 and grad_checkpointing true "
                           "(ViT encoders: open_clip's ResNets do not checkpoint), or lower batch_size") from None

    def _step(self, loader_batch, step: int) -> dict:
        batch = self.on_device(loader_batch)
        self.optimizer.zero_grad(set_to_none=True)
        micro, totals = len(batch.images) // self.accum_steps, {}
        for k in range(self.accum_steps):  # DDP syncs gradients on the last micro-batch only
            part = slice(k * micro, (k + 1) * micro)
            piece = Batch(batch.images[part], batch.tokens[part], batch.raw_images[part],
                          None if batch.captions is None else batch.captions[part],
                          None if batch.labels is None else batch.labels[part])
            sync = k == self.accum_steps - 1 or not self.ddp
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), autocast(self.precision, self.device):
                terms = self.objective(self.wrapped, piece)
            self.scaler.scale(terms["loss"] / self.accum_steps).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / self.accum_steps
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with autocast(self.precision, self.device):  # a hook's forward passes (invert's re-inversion) as the step's
            self.objective.after_step(self.model)
        self.finite.watch(totals["loss"], step + 1)  # numbered as the log numbers it: the first step is 1
        return totals


def make_step(cfg: TrainConfig, dist: Dist, device: torch.device) -> Step:
    """The training step ``cfg`` describes, on this process: seeds torch's global stream (the model's
    initialisation, the objective's own draws), builds model and objective (``build_model``), the
    optimiser, the loss scaler and the augmentation with its generator on the device."""
    torch.manual_seed(cfg.seed + dist.rank)
    model, wrapped, objective, _ = build_model(cfg, dist, device)
    return Step(model, wrapped, objective, make_optimizer(cfg, model, device),
                torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp"), AUGMENTATIONS.get(cfg.augment),
                torch.Generator(device).manual_seed(cfg.seed + 1 + dist.rank), cfg.precision, cfg.accum_steps,
                device, dist.world_size > 1, FiniteWatch(device, cfg.lr, model.parameters()))


def epoch_batches(data, epoch: int, skip: int):
    """``data.epoch(epoch, skip)``, drawing from torch's global random stream as an unbroken run does.
    A DataLoader draws its workers' base seed from that stream when a pass starts. A pass that continues
    an epoch (``skip`` > 0: resuming) must not draw it again, as the run that saved the state drew it
    before saving: the extra draw would shift every later draw from that stream (torchvision's AutoAugment
    and v2 transforms, CleanCLIP's and RoCLIP's views). Decoding draws nothing, so that seed is moot."""
    if not skip:
        yield from data.epoch(epoch, skip)
        return
    with torch.random.fork_rng(devices=[]):
        batches = iter(data.epoch(epoch, skip))
        first = next(batches, None)  # the pass, and its seed draw, start here
    if first is not None:
        yield first
        yield from batches


def save_resumable(run: RunFolder, step: Step, progress: dict, dist: Dist) -> None:
    """Writes ``run.state`` (one file, atomically): weights, optimiser, loss scale, the data position
    ``progress`` (step, epoch, batches done in it, seconds trained), every rank's random streams and the
    run's fingerprint, so that only the same run resumes it. The loss and the weights are checked first: a
    saved state is always a good one."""
    step.finite.check(run.state, dist, progress["step"])
    rng = dist.gather_to_main(rng_state({"augment": step.generator}, step.objective))
    if dist.main:
        save_state(run.state, {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict(),
                               "scaler": step.scaler.state_dict(), **progress, "rng": rng,
                               "fingerprint": run.fingerprint})


def restore_resumable(path: Path, step: Step, dist: Dist) -> Tuple[int, int, int, float]:
    """The inverse of ``save_resumable`` (the run folder has checked the state belongs to this run):
    restores ``step``'s weights, optimiser, loss scale and this rank's random streams; returns the data
    position (step, epoch, batches done in it) and the seconds trained up to it."""
    state = load_state(path)
    step.model.load_state_dict(state["model"])
    step.optimizer.load_state_dict(state["optimizer"])
    step.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][dist.rank], {"augment": step.generator}, step.objective)
    return state["step"], state["epoch"], state["batches_done"], state.get("elapsed_s", 0.0)  # 0: older states


class FiniteWatch:
    """Remembers the first step whose loss was not finite, on the device: checking every step would make
    the CPU wait for the GPU at every step. ``check`` (before logging, saving a state, and the checkpoint)
    raises, so no state or checkpoint is written from a diverged model; it also checks ``parameters``, as
    without a loss scaler (fp32, bf16) one overflowing backward pass writes NaN into the weights under a
    finite loss. ``lr`` is the configured one, for the message."""

    def __init__(self, device: torch.device, lr: float, parameters=()):
        self.lr = lr
        self.parameters = list(parameters)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def watch(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss.float(), self.value)

    def check(self, state: Path, dist: Optional[Dist] = None, at: Optional[int] = None) -> None:
        """Raises on every process if any process saw a non-finite loss (so none waits on the others), or
        if the weights (the same on every process) are no longer finite at step ``at``."""
        step = self.step.clone()
        if dist is not None and dist.world_size > 1:
            never = torch.iinfo(torch.long).max
            step = torch.where(step < 0, never, step)
            torch.distributed.all_reduce(step, op=torch.distributed.ReduceOp.MIN)
            step = torch.where(step == never, -1, step)
        first = int(step)
        if first >= 0:
            value = self.value.item() if int(self.step) == first else "not finite on another process"
            where = f"; the last good state is {state}" if state.exists() else ""
            raise ParError(f"loss became {value} at step {first}; lower lr (now {self.lr}) or check the data{where}")
        if self.parameters and not bool(torch.stack([p.detach().isfinite().all() for p in self.parameters]).all()):
            where = f"; the last good state is {state}" if state.exists() else ""
            raise ParError(f"weights became non-finite by step {at} under a finite loss (an overflowing "
                           f"gradient); lower lr (now {self.lr}) or train in amp, whose loss scaler skips such "
                           f"steps{where}")


def finish(cfg: TrainConfig, run: RunFolder, dist: Dist, model, objective, step: int, seconds: float,
           steps_run: int) -> Path:
    """Checks that replicas agree, then writes the checkpoint, records the run as finished and draws the
    training plot (rank 0)."""
    if dist.world_size > 1:
        drift = replica_drift(model)
        if dist.main:
            (run.out / "distributed.json").write_text(json.dumps({"world_size": dist.world_size,
                                                                  "replica_drift": drift}) + "\n")
        if drift > 1e-6:
            raise RuntimeError(f"model replicas diverged across ranks (max checksum difference {drift:.3g})")
    if dist.main:
        models.save_checkpoint(model, run.checkpoint, {"step": step, "objective": cfg.objective,
                                                       "config": dataclasses.asdict(cfg)})
        run.mark_finished(step)  # right after the checkpoint: a run stopped before this is not a finished one
        plot_training(run.metrics, run.out / "training.png", **objective.plot_guides())  # a picture of the log
        print(f"wrote {run.checkpoint} ({steps_run} steps in {seconds:.0f} s)")
    if dist.world_size > 1:
        dist.barrier()
        dist.close()
    return run.checkpoint
