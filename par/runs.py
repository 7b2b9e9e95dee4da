"""A training run's folder: its identity, resumable states and metric logs.

A folder holds one run. ``fingerprint.json`` says what makes it that run (its settings minus
cosmetic ones, and digests of its inputs), so a finished run is reused only by an identical
one and an unfinished one is resumed only with the same settings. A resumable state is one
atomically written file holding weights, optimiser, scaler, data position and the random
streams of every rank, so a kill at any moment leaves a consistent state behind.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from par.config import dump
from par.errors import ParError
from par.utils import atomic_save, path_digest


def fingerprint(cfg, cosmetic: Iterable[str], inputs: Iterable[str]) -> dict:
    """What makes two runs the same: ``cfg`` minus ``cosmetic`` fields, plus digests of the ``inputs`` files."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in set(cosmetic)}
    for name in inputs:
        if getattr(cfg, name):
            values[f"{name}_digest"] = path_digest(getattr(cfg, name))
    return values


def _set(fp: dict) -> dict:
    """What a fingerprint says about a run: unset (None) settings left out, so a setting added to the
    code later, unset by default, does not make older runs strangers; and an input known by its digest
    is compared by that, not by how its path was spelt (relative or absolute, another checkout)."""
    return {k: v for k, v in fp.items() if v is not None and f"{k}_digest" not in fp}


def _diff(a: dict, b: dict) -> list:
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


class RunFolder:
    """``status`` is ``finished`` (an identical run is done: ``found`` is its checkpoint), ``resume``
    (``found`` is the state to continue from) or ``new``."""

    def __init__(self, out, fp: dict, dist, reuse: bool = False, resume: Optional[str] = None, config=None):
        self.out = Path(out)
        self.checkpoint = self.out / "checkpoint.pt"
        self.state = self.out / "state-latest.pt"
        self.metrics = self.out / "metrics.jsonl"
        self.status, self.found = self._check(fp, reuse, resume)
        if self.status == "new":
            dist.barrier()  # every rank has checked before rank 0 writes
            if dist.main:
                self.out.mkdir(parents=True, exist_ok=True)
                if config is not None:
                    (self.out / "config.yaml").write_text(dump(config))
                (self.out / "fingerprint.json").write_text(json.dumps(fp, indent=2) + "\n")

    def _check(self, fp: dict, reuse: bool, resume: Optional[str]):
        """Never overwrites a finished run; never resumes or reuses a folder made with other settings."""
        record = self.out / "fingerprint.json"
        old = json.loads(record.read_text()) if record.exists() else None
        if old is not None and _set(old) != _set(fp) and (reuse or resume):
            raise ParError(f"run folder {self.out} was made with other settings (differs in {_diff(fp, old)}); "
                           "choose another out")
        if resume:
            path = self.state if resume == "latest" else Path(resume)
            if self.checkpoint.exists():
                raise ParError(f"run folder {self.out} already holds a finished run; nothing to resume")
            if not path.exists():
                raise ParError(f"no state to resume from: {path} not found (was save_every set?)")
            return "resume", path
        if self.checkpoint.exists():
            if reuse:
                return "finished", self.checkpoint
            raise ParError(f"run folder {self.out} already holds a finished run; choose another out (or pass --reuse)")
        if self.state.exists():
            raise ParError(f"run folder {self.out} holds an unfinished run; continue it with --resume latest "
                           "or choose another out")
        return "new", None


def rng_state(generators: dict, objective) -> dict:
    """This process's random streams: torch's (CPU and CUDA), named generators, the objective's state."""
    state = {"torch": torch.get_rng_state(), "objective": objective.state_dict(),
             **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict, objective) -> None:
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    objective.load_state_dict(state["objective"])


def save_state(path: Path, state: dict) -> None:
    atomic_save(state, path)


def load_state(path: Path, world_size: int) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state["rng"]) != world_size:
        raise ParError(f"{path} was saved by {len(state['rng'])} process(es); resume it with as many, not {world_size}")
    return state


class MetricsLog:
    """``metrics.jsonl`` (kept up to ``from_step`` when resuming) and TensorBoard when installed; rank 0 only.

    A context manager: the files are closed also when training fails.
    """

    def __init__(self, path: Path, enabled: bool, from_step: int = 0, tensorboard: bool = True):
        self.file, self.board = None, None
        if not enabled:
            return
        kept = []
        if from_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= from_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.board = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        for sink in (self.file, self.board):
            if sink is not None:
                sink.close()
        self.file = self.board = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
