"""One training loop for pre-training a CLIP from scratch and for cleaning a checkpoint.

``objective: clip`` is the plain CLIP loss (pre-training, or plain fine-tuning);
``objective: par`` adds a frozen copy of the starting checkpoint and PAR's perturb term.
Read ``train`` top to bottom: setup, data, optimiser, loop, checkpoint.
"""
from __future__ import annotations

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
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 50
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    workers: int = 0  # DataLoader workers (decoding) when not preloading
    preload: bool = True  # decode every image once into memory (small datasets)
    log_every: int = 10
    progress: bool = True


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainConfig) -> dict:
    """What makes two runs the same: the config (minus cosmetics) and the digests of its inputs."""
    values = dataclasses.asdict(cfg)
    for cosmetic in ("out", "progress", "log_every", "workers", "threads", "preload", "device"):
        values.pop(cosmetic)
    values["train_csv_digest"] = file_digest(cfg.train_csv)
    if cfg.init_checkpoint:
        values["init_checkpoint_digest"] = file_digest(cfg.init_checkpoint)
    return values


def validate(cfg: TrainConfig) -> None:
    from par.objectives import OBJECTIVES

    if OBJECTIVES.get(cfg.objective).needs_frozen and not cfg.init_checkpoint:
        raise ParError(f"objective {cfg.objective!r} cleans a checkpoint: set init_checkpoint")
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ParError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.warmup >= cfg.steps:
        raise ParError(f"warmup ({cfg.warmup}) must be shorter than steps ({cfg.steps})")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParError(f"device {name!r} requested but CUDA is not available")
    return device


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases, norms, embeddings' gains and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        flat = p.ndim < 2 or "bias" in name or "ln_" in name or ".bn" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _prepare_run_folder(cfg: TrainConfig, reuse: bool) -> Optional[Path]:
    """Creates the run folder; returns the finished checkpoint when ``reuse`` finds an identical run."""
    out = Path(cfg.out)
    done = out / "checkpoint.pt"
    record = out / "fingerprint.json"
    fp = fingerprint(cfg)
    if done.exists():
        old = json.loads(record.read_text()) if record.exists() else None
        if reuse and old == fp:
            return done
        if reuse and old is not None:
            diff = sorted(k for k in fp.keys() | old.keys() if fp.get(k) != old.get(k))
            raise ParError(f"run folder {out} was made with other settings (differs in {diff}); choose another out")
        raise ParError(f"run folder {out} already holds a finished run; choose another out (or pass --reuse)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump(cfg))
    record.write_text(json.dumps(fp, indent=2) + "\n")
    return None


def train(cfg: TrainConfig, reuse: bool = False) -> Path:
    """Runs the training described by ``cfg`` and returns the path of the final checkpoint."""
    from open_clip import ClipLoss
    from open_clip_train.scheduler import cosine_lr
    from tqdm import tqdm

    from par import models
    from par.augment import AUGMENTATIONS
    from par.data import ImageCaptionDataset, preload, to_float
    from par.objectives import OBJECTIVES, Batch

    validate(cfg)
    augment = AUGMENTATIONS.get(cfg.augment)
    models.canonical_model_name(cfg.model)  # fail on a bad name before anything is written
    finished = _prepare_run_folder(cfg, reuse)
    if finished is not None:
        print(f"reusing {finished} (same settings and inputs)")
        return finished
    out = Path(cfg.out)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)

    # ---- model, and for PAR the frozen poisoned copy
    model = models.create_model(cfg.model)
    if cfg.init_checkpoint:
        models.load_weights(model, cfg.init_checkpoint)
    model.logit_scale.requires_grad_(cfg.train_logit_scale)
    model.to(device).train()
    objective_cls = OBJECTIVES.get(cfg.objective)
    frozen = copy.deepcopy(model).eval().requires_grad_(False) if objective_cls.needs_frozen else None
    mean, std = models.image_mean_std(model)
    tokenizer = models.get_tokenizer(cfg.model)
    objective = objective_cls(cfg, ClipLoss(), frozen=frozen, tokenizer=tokenizer, mean=mean, std=std, seed=cfg.seed)

    # ---- data: batches of uint8 images, token ids and row indices, reshuffled every epoch
    dataset = ImageCaptionDataset(cfg.train_csv, tokenizer, models.image_size(model), cfg.image_root)
    captions = dataset.captions
    if cfg.preload:
        dataset = preload(dataset, workers=cfg.workers, desc="decode train images", progress=cfg.progress)
    if len(dataset) < cfg.batch_size:
        raise ParError(f"{cfg.train_csv} has {len(dataset)} rows, fewer than one batch of {cfg.batch_size}")
    shuffle = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=shuffle,
        num_workers=0 if cfg.preload else cfg.workers, pin_memory=device.type == "cuda",
    )
    aug_rng = torch.Generator().manual_seed(cfg.seed + 1)

    # ---- optimiser and schedule
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )
    schedule = cosine_lr(optimizer, cfg.lr, cfg.warmup, cfg.steps)

    # ---- loop
    log = open(out / "metrics.jsonl", "w")
    bar = tqdm(total=cfg.steps, desc=f"train ({cfg.objective})", unit="step", disable=not cfg.progress)
    step, start, seen = 0, time.time(), 0
    while step < cfg.steps:
        for raw_images, tokens, rows in loader:
            if step >= cfg.steps:
                break
            lr = schedule(step)
            raw_images = raw_images.to(device, non_blocking=True)
            batch = Batch(
                images=augment(to_float(raw_images), mean, std, generator=aug_rng),
                tokens=tokens.to(device, non_blocking=True), raw_images=raw_images,
                captions=[captions[i] for i in rows.tolist()],
            )
            terms = objective(model, batch)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise ParError(f"loss became {loss.item()} at step {step}; lower lr (now {cfg.lr}) or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            seen += raw_images.shape[0]
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                          "samples_per_s": seen / (time.time() - start), "elapsed_s": time.time() - start}
                record.update({k: v.item() for k, v in terms.items()})
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    log.close()

    checkpoint = models.save_checkpoint(
        model, out / "checkpoint.pt", {"step": step, "objective": cfg.objective, "config": dataclasses.asdict(cfg)}
    )
    print(f"wrote {checkpoint} ({step} steps, {time.time() - start:.0f} s)")
    return checkpoint
