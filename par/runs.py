"""A training run's folder: its identity, resumable states and metric logs.

A folder holds one run. ``fingerprint.json`` says what makes it that run (its settings minus
cosmetic ones, and digests of its inputs) and, once it is done, that it finished and with which
checkpoint, so a finished run is reused only by an identical one, and files the folder's run did
not write (a copied checkpoint) are never taken for its results. A resumable state is one
atomically written file holding weights, optimiser, scaler, data position, the random streams of
every rank and the run's fingerprint, so a kill at any moment leaves a consistent state behind and
a state is resumed only by the run that saved it.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import time
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from par.config import dump
from par.errors import ParError
from par.utils import atomic_save, atomic_write_text, file_digest, path_digest


def fingerprint(cfg, cosmetic: Iterable[str], inputs: Iterable[str]) -> dict:
    """What makes two runs the same: ``cfg`` minus ``cosmetic`` fields, plus digests of the ``inputs`` files."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in set(cosmetic)}
    for name in inputs:
        if getattr(cfg, name):
            values[f"{name}_digest"] = path_digest(getattr(cfg, name))
    return values


FINISHED = "finished"  # fingerprint.json's record of a finished run: its last step and its checkpoint's digest
STATE_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batches_done", "rng")


def _set(fp: dict) -> dict:
    """What a fingerprint says about a run: unset (None) settings left out, so a setting added to the
    code later, unset by default, does not make older runs strangers; and an input known by its digest
    is compared by that, not by how its path was spelt (relative or absolute, another checkout)."""
    return {k: v for k, v in fp.items() if v is not None and f"{k}_digest" not in fp and k != FINISHED}


def _diff(a: dict, b: dict) -> list:
    a, b = ({k: v for k, v in d.items() if k != FINISHED} for d in (a, b))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def timestamped_folder(parent: Path, stem: str) -> Path:
    """A new folder name under ``parent``: ``STEM-YYYYmmdd-HHMMSS``, with ``-2``, ``-3``... appended when
    a run started within the same second already took it (two runs never share a folder)."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while (Path(parent) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return Path(parent) / name


def interrupted(out) -> Optional[str]:
    """``"latest"`` where the run folder ``out`` holds a state saved by a run that did not finish (one stopped
    after a ``save_every`` save), else None: what a program rebuilding its folders passes as ``resume``."""
    out = Path(out)
    if not (out / "state-latest.pt").is_file() or not (out / "fingerprint.json").is_file():
        return None
    try:
        record = json.loads((out / "fingerprint.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # RunFolder says what is wrong with it
    return None if FINISHED in record else "latest"


class RunFolder:
    """``status`` is ``finished`` (an identical run is done: ``found`` is its checkpoint), ``resume``
    (``found`` is the state to continue from, checked to be this run's) or ``new``. Only what the folder's
    ``fingerprint.json`` records is trusted: a run is finished when it says so and the checkpoint is the
    one it wrote; a state is resumed only when the fingerprint it was saved with matches."""

    def __init__(self, out, fp: dict, dist, reuse: bool = False, resume: Optional[str] = None, config=None):
        self.out = Path(out)
        self.fingerprint = fp
        self.checkpoint = self.out / "checkpoint.pt"
        self.state = self.out / "state-latest.pt"
        self.metrics = self.out / "metrics.jsonl"
        self.record = self.out / "fingerprint.json"
        self.status, self.found, self._unclaimed = self._check(fp, reuse, resume, dist.world_size)
        self._dist, self._config = dist, config
        # the metrics log whose lines up to the resumed step are kept (another folder's, resuming its state)
        self.history = self.found.parent / "metrics.jsonl" if self.status == "resume" else None

    def claim(self) -> None:
        """Writes the folder's ``config.yaml`` and ``fingerprint.json`` (when it has none yet). Called once
        everything the run reads (data, initial weights) has been opened and found usable, so a request
        refused for bad input leaves no folder behind."""
        if not self._unclaimed:
            return
        self._unclaimed = False
        self._dist.barrier()  # every rank has checked before rank 0 writes
        if self._dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self._config is not None:
                (self.out / "config.yaml").write_text(dump(self._config))
            atomic_write_text(self.record, json.dumps(self.fingerprint, indent=2) + "\n")

    def _read_record(self) -> Optional[dict]:
        if not self.record.exists():
            return None
        try:
            return json.loads(self.record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ParError(f"run folder {self.out} has an unreadable fingerprint.json ({e}); choose another out")

    def _check(self, fp: dict, reuse: bool, resume: Optional[str], world_size: int):
        """(status, found, whether to write the folder's record). Never overwrites a finished run; never
        resumes or reuses a folder or a state made with other settings."""
        old = self._read_record()
        finished = old is not None and FINISHED in old
        if old is not None and _set(old) != _set(fp) and (reuse or resume):
            raise ParError(f"run folder {self.out} was made with other settings (differs in {_diff(fp, old)}); "
                           "choose another out")
        if resume:
            path = self.state if resume == "latest" else Path(resume)
            if finished:
                raise ParError(f"run folder {self.out} already holds a finished run; nothing to resume")
            if not path.is_file():
                raise ParError(f"no state to resume from: {path} not found (was save_every set?)")
            self._check_state(path, fp, world_size, vouched=old is not None and path.resolve() == self.state.resolve())
            return "resume", path, old is None
        if finished:
            if not reuse:
                raise ParError(f"run folder {self.out} already holds a finished run; choose another out "
                               "(or pass --reuse)")
            digest = old[FINISHED].get("checkpoint_digest") if isinstance(old[FINISHED], dict) else None
            if not self.checkpoint.is_file() or file_digest(self.checkpoint) != digest:
                raise ParError(f"{self.checkpoint} is not the checkpoint the run in {self.out} finished with "
                               "(missing or changed since); choose another out")
            return "finished", self.checkpoint, False
        if self.checkpoint.exists():
            record = "no fingerprint.json" if old is None else "its fingerprint.json does not record it"
            raise ParError(f"run folder {self.out} holds a checkpoint.pt no finished run wrote there ({record}: "
                           "a copied file, or a run stopped while writing it); choose another out")
        if self.state.exists():
            raise ParError(f"run folder {self.out} holds an unfinished run; continue it with --resume latest "
                           "or choose another out")
        return "new", None, True

    @staticmethod
    def _check_state(path: Path, fp: dict, world_size: int, vouched: bool) -> None:
        """A state resumes this run only if it was saved with this run's fingerprint (a state saved before
        states held one is trusted in the folder whose record matches, ``vouched``) and as many processes."""
        state = load_state(path, mmap=True)  # reads the records, not the tensors
        if len(state["rng"]) != world_size:
            raise ParError(f"{path} was saved by {len(state['rng'])} process(es); resume it with as many, "
                           f"not {world_size}")
        saved = state.get("fingerprint")
        if saved is None and not vouched:
            raise ParError(f"{path} does not record which run saved it; resume it in its own run folder "
                           "(--resume latest there)")
        if saved is not None and _set(saved) != _set(fp):
            raise ParError(f"{path} was saved by a run with other settings (differs in {_diff(fp, saved)}); "
                           "resume it with the settings it was saved with")

    def mark_finished(self, step: int) -> None:
        """Records in ``fingerprint.json`` that the run finished, with its checkpoint's digest: written after
        the checkpoint, so a run stopped in between is not taken for a finished one."""
        record = {**self.fingerprint, FINISHED: {"step": step, "checkpoint_digest": file_digest(self.checkpoint)}}
        atomic_write_text(self.record, json.dumps(record, indent=2) + "\n")


def rng_state(generators: dict, objective) -> dict:
    """This process's random streams: torch's (CPU, and its own GPU's), named generators, the objective's state."""
    state = {"torch": torch.get_rng_state(), "objective": objective.state_dict(),
             **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's: the one this process trains on
    return state


def set_rng_state(state: dict, generators: dict, objective) -> None:
    """Restores ``rng_state``'s streams; a state saved on another kind of device is a one-line error (a CPU
    generator's state is 5,056 bytes, a CUDA one's 16: torch would fail with "RNG state is wrong size")."""
    for name, g in generators.items():
        if state[name].numel() != g.get_state().numel():
            raise ParError(f"this resumable state was saved on another kind of device than {g.device.type} (its "
                           f"'{name}' random stream does not fit); resume it on the kind of device it was saved on")
    if torch.cuda.is_available() and "cuda" in state:
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # states written before held every visible GPU's stream
            index = torch.cuda.current_device()
            if index >= len(saved):
                raise ParError(f"this resumable state holds the random streams of {len(saved)} GPU(s), none for "
                               f"GPU {index}; resume it with the GPUs it was saved with")
            saved = saved[index]
        torch.cuda.set_rng_state(saved)
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state[name])
    objective.load_state_dict(state["objective"])


def save_state(path: Path, state: dict) -> None:
    atomic_save(state, path)


def load_state(path: Path, mmap: bool = False) -> dict:
    """A resumable state read back (``mmap``: tensors mapped, not read). A file that is not one, such as
    a state cut short by a full disk or a checkpoint, is a one-line error."""
    unreadable = f"cannot read the state {path}: it is truncated or not a resumable state"
    if not zipfile.is_zipfile(path):  # a cut-short file has lost the archive's directory, at its end
        raise ParError(f"{unreadable} (not a complete archive)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ParError(f"{unreadable} ({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from e
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ParError(f"{path} is not a resumable state (it lacks {missing})")
    return state


class MetricsLog:
    """``metrics.jsonl`` and TensorBoard when installed; rank 0 only. Resuming at ``from_step``, the lines
    of ``history`` (default: ``path``; another run's log when resuming its state) up to that step are kept.

    A context manager: the files are closed also when training fails.
    """

    def __init__(self, path: Path, enabled: bool, from_step: int = 0, tensorboard: bool = True,
                 history: Optional[Path] = None):
        self.file, self.board = None, None
        if not enabled:
            return
        kept, history = [], history or path
        if from_step and history.exists():
            kept = [line for line in history.read_text().splitlines() if json.loads(line)["step"] <= from_step]
        self.file = open(path, "w")
        self.file.writelines(line + "\n" for line in kept)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                # resumed at from_step: the killed run's later events are dropped, as its later metrics lines are
                self.board = SummaryWriter(str(path.parent / "tensorboard"), purge_step=from_step + 1 if from_step else None)

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
