"""General helpers at the bottom of the library: devices, precision, atomic writes, digests, images.

Every other module may import this one; it imports nothing from ``par`` but the error type.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from par.errors import ParError

PRECISIONS = ("fp32", "amp", "amp_bf16")
DIGEST_LENGTH = 16  # hex characters of SHA-256 kept in every digest par writes


def restores_torch_threads(fn: Callable) -> Callable:
    """``fn`` may set torch's CPU thread count for its own work (a run's ``threads``); its caller's count is
    restored when it returns or fails, since a benchmark or a test suite runs many such calls in one process."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; an unavailable device is an error, never a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a training precision: none for fp32, fp16 for ``amp``, bf16 for ``amp_bf16``."""
    if precision not in PRECISIONS:
        raise ParError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "amp_bf16" else torch.float16)


def unscaled_precision(device: torch.device | str):
    """The autocast for passes whose gradients are taken without the GradScaler (an attack's, a trigger's):
    the one in force, but fp16 (`amp`), whose unscaled gradients can underflow to 0, becomes bf16 where the
    device has it natively (fp32's range at fp16's cost), else fp32."""
    device = torch.device(device).type
    if not (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16):
        return contextlib.nullcontext()
    native = device != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast(device, dtype=torch.bfloat16) if native else torch.autocast(device, enabled=False)


def inference_precision(device: torch.device | str) -> str:
    """Evaluation's precision: bf16 autocast on CUDA (fast, accurate enough to rank), exact fp32 on CPU."""
    return "amp_bf16" if torch.device(device).type == "cuda" else "fp32"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp)`` then renames ``tmp`` over ``path``: readers see the old file or the new, never half.

    The temporary name keeps the suffix (``x.png`` -> ``x.tmp.png``) so writers that go by it still can.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Holds an exclusive lock on ``path`` (created if missing) while the block runs: two processes that
    would build the same folder (a benchmark's cells side by side) take turns, and the second reuses it."""
    import fcntl  # POSIX; the processes that share a folder run on one machine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (tensors and plain values only, so that ``weights_only`` loading works)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def digest(value) -> str:
    """Digest of a JSON-able value (keys sorted): names folders and records by the settings they hold."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]


def file_digest(path: str | os.PathLike) -> str:
    """Digest of a file's bytes, in the same convention as ``digest``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:DIGEST_LENGTH]


def path_digest(path: str | os.PathLike) -> str:
    """``file_digest`` of a file; of a folder (a class-folder tree) or a shard pattern, the digest of
    its files' paths and sizes (reading every byte of ImageNet to name a run would take longer than the run)."""
    if str(path).endswith(".tar") and "{" in str(path):  # webdataset shards: their names and sizes, as a folder's
        import braceexpand

        files = [Path(f) for f in braceexpand.braceexpand(str(path))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ParError(f"not found: {missing[0]} (of shard pattern {path})")
        return digest([(str(f), f.stat().st_size) for f in files])
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise ParError(f"not found: {path}")
    return digest(sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file()))


def to_pil(image: torch.Tensor):
    """A ``[3, H, W]`` image (float in [0, 1] or uint8) as a PIL RGB image."""
    from PIL import Image

    if image.is_floating_point():
        image = (image.detach().float().clamp(0, 1) * 255).round().byte()
    return Image.fromarray(image.cpu().permute(1, 2, 0).numpy())


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (what ``mkdir(parents=True)`` would build on)."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _check_parent(path: Path, what: str) -> None:
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ParError(f"cannot write {what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ParError(f"cannot write {what} {path}: folder {base} is not writable")


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Refuses an output file that could not be written, before any work is done: a folder in its
    place, a file where a parent folder must go, an unwritable folder. Creates nothing."""
    path = Path(path)
    if not str(path).strip():
        raise ParError(f"{what}: empty path")
    if path.is_dir():
        raise ParError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not path.is_file():
        raise ParError(f"{what} {path} exists and is not a regular file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ParError(f"{what} {path} is not writable")
    _check_parent(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuses an output folder that could not be made or written, before any work is done: a file in
    its place, a file where a parent folder must go, an unwritable folder. Creates nothing."""
    path = Path(path)
    if not str(path).strip():
        raise ParError(f"{what}: empty path")
    if path.exists() and not path.is_dir():
        raise ParError(f"{what} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ParError(f"{what} {path} is not writable")
        return path
    _check_parent(path, what)
    return path


def check_device(name: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, refused early with the choices rather than deep in torch
    (an ordinal beyond the visible GPUs too); whether CUDA is there at all is ``pick_device``'s to say."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name.strip()):
        raise ParError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda:") and torch.cuda.is_available() and int(name[5:]) >= torch.cuda.device_count():
        raise ParError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return name.strip()
