"""A trigger as a file: ``mask`` [1, H, W] and ``pattern`` [3, H, W] in [0, 1] (safetensors), what a scan
writes beside its ``scan.json`` and what ``invert`` unlearns; read back checked, never unpickled."""
from __future__ import annotations

from pathlib import Path

import torch

from par.errors import ParError

TRIGGER_FILE = "trigger.safetensors"


def load_trigger(path: str) -> tuple:
    """(mask [1, H, W], pattern [3, H, W]) from a trigger file, checked: finite, in [0, 1], shapes that fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ParError(f"trigger file not found: {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ParError(f"cannot read trigger file {path}: {e}") from None
    missing = [k for k in ("mask", "pattern") if k not in tensors]
    if missing:
        raise ParError(f"trigger file {path} lacks {missing} (it holds {sorted(tensors)})")
    mask, pattern = tensors["mask"].float(), tensors["pattern"].float()
    if mask.dim() != 3 or mask.shape[0] != 1 or pattern.dim() != 3 or pattern.shape[0] != 3:
        raise ParError(f"trigger file {path}: mask must be [1, H, W] and pattern [3, H, W], got "
                       f"{list(mask.shape)} and {list(pattern.shape)}")
    for name, t in (("mask", mask), ("pattern", pattern)):
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ParError(f"trigger file {path}: {name} must be finite and in [0, 1]")
    return mask, pattern


def save_trigger(path: Path, mask: torch.Tensor, pattern: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    from par.utils import atomic_write

    tensors = {"mask": mask.detach().float().cpu().contiguous(), "pattern": pattern.detach().float().cpu().contiguous()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp)))
