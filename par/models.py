"""CLIP encoders by name, and checkpoint I/O that never unpickles arbitrary objects.

Models come from open_clip's registry, extended with JSON model configs (open_clip's
schema, file name = encoder name) from three places, later ones winning on a name clash:
``par/model_configs/`` (package data: the tiny encoders of the synthetic world, shipped with
the package), the repository's ``configs/models/`` when running from a checkout (a user adds
an encoder by dropping a file there), and the folders named by ``PAR_MODEL_CONFIGS``. A model is
normalised with the mean and std of its file's ``preprocess_cfg``, else of open_clip's pretrained weights for
it (``preprocess_of``); its pixels are always prepared as OpenAI's CLIP prepares them.

Checkpoints are untrusted input: ``.pt``/``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)`` (only ``argparse.Namespace`` is allow-listed, for the
PAR authors' checkpoints) and ``.safetensors`` with safetensors. Loading weights into a
model is strict: a missing, unexpected or mis-shaped key is an error naming the keys.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from par.errors import ParError
from par.utils import atomic_save, atomic_write

PACKAGE_MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
REPO_MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"  # absent in an installed package
MODEL_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
# what par's preprocessing does (data.eval_transform): open_clip's defaults, the OpenAI CLIP's
FIXED_PREPROCESS = {"interpolation": "bicubic", "resize_mode": "shortest"}
OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
_registered = False
_preprocess: Dict[str, dict] = {}  # encoder -> the preprocess_cfg its file gives (open_clip's registry drops it)


def register_model_configs() -> None:
    """Adds ``par/model_configs``, ``configs/models`` (if any), ``$PAR_MODEL_CONFIGS`` to open_clip's registry (once).

    A user's file is open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``), optionally with
    a ``preprocess_cfg`` beside those keys, or a hub ``open_clip_config.json`` (``model_cfg`` and
    ``preprocess_cfg``) saved under the encoder's name: its mean and std then normalise the images."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(PACKAGE_MODEL_CONFIGS)
    folders = [REPO_MODEL_CONFIGS] + [Path(p) for p in os.environ.get("PAR_MODEL_CONFIGS", "").split(os.pathsep) if p]
    files = {path.stem: path for folder in folders if folder.is_dir() for path in sorted(folder.glob("*.json"))}
    read = {name: _read_model_config(path) for name, path in files.items()}  # every file checked before any is added
    for name, (model_cfg, preprocess) in read.items():
        # open_clip reads only the flat layout from files, so the checked config goes into its registry itself
        open_clip.factory._MODEL_CONFIGS[name] = model_cfg
        if preprocess is not None:
            _preprocess[name] = preprocess
    _registered = True


def _read_model_config(path: Path):
    """``(model config, preprocess_cfg or None)`` from a user's JSON file, or a one-line error naming it."""
    import json

    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParError(f"encoder config {path}: not readable JSON ({e})") from None
    if not isinstance(values, dict):
        raise ParError(f"encoder config {path}: must be a JSON object, got {type(values).__name__}")
    model_cfg = values["model_cfg"] if "model_cfg" in values else values
    if not isinstance(model_cfg, dict) or not all(key in model_cfg for key in MODEL_KEYS):
        raise ParError(f"encoder config {path}: an open_clip model config needs the keys {', '.join(MODEL_KEYS)} "
                       f"(at the top, or under 'model_cfg' as in a hub's open_clip_config.json)")
    model_cfg = {k: v for k, v in model_cfg.items() if k != "preprocess_cfg"}
    preprocess = values.get("preprocess_cfg")  # beside model_cfg, or beside the model's own keys
    size = model_cfg["vision_cfg"].get("image_size") if isinstance(model_cfg["vision_cfg"], dict) else None
    return model_cfg, None if preprocess is None else _checked_preprocess(preprocess, f"encoder config {path}", size)


def _checked_preprocess(preprocess, source: str, size) -> dict:
    """The mean and std a preprocess_cfg gives; settings par's preprocessing does not follow refused."""
    import math

    if not isinstance(preprocess, dict):
        raise ParError(f"{source}: 'preprocess_cfg' must be a mapping, got {preprocess!r}")
    unknown = sorted(set(preprocess) - {"mean", "std", "size", "fill_color", "mode"} - set(FIXED_PREPROCESS))
    if unknown:
        raise ParError(f"{source}: unknown 'preprocess_cfg' key(s) {unknown} (par reads mean and std)")
    for key, value in {**FIXED_PREPROCESS, "mode": "RGB"}.items():
        if preprocess.get(key, value) != value:
            raise ParError(f"{source}: preprocess_cfg {key} {preprocess[key]!r} is not what par does (images are "
                           f"resized {FIXED_PREPROCESS['interpolation']} along their shortest side and centre-cropped, "
                           f"as for OpenAI's CLIP); the images would be prepared otherwise than this encoder expects")
    def pair(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value, value)

    if "size" in preprocess and pair(preprocess["size"]) != pair(size or 224):  # open_clip's default image_size
        raise ParError(f"{source}: preprocess_cfg size {preprocess['size']!r} differs from the "
                       f"vision tower's image_size {size!r}")
    out = {}
    for key in ("mean", "std"):
        if key not in preprocess:
            continue
        value = preprocess[key]
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                or (key == "std" and min(value) <= 0)):
            raise ParError(f"{source}: preprocess_cfg {key} must be 3 finite numbers (one per colour "
                           f"channel{', each > 0' if key == 'std' else ''}), got {value!r}")
        out[key] = tuple(float(v) for v in value)
    return out


def preprocess_of(canonical: str) -> Optional[dict]:
    """The mean and std images are normalised with for encoder ``canonical``: its config file's, else those of
    open_clip's pretrained weights for it where they all agree (SigLIP's 0.5, say), else None (OpenAI's)."""
    import open_clip

    if canonical in _preprocess:
        return _preprocess[canonical]
    settings = {tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()
                             if k in ("mean", "std", "interpolation", "resize_mode")))
                for cfg in (open_clip.get_pretrained_cfg(canonical, tag)
                            for tag in open_clip.list_pretrained_tags_by_model(canonical))}
    if len(settings) != 1:  # no weights known, or weights prepared differently: open_clip's default, OpenAI's
        return None
    size = (open_clip.get_model_config(canonical) or {}).get("vision_cfg", {}).get("image_size")
    return _checked_preprocess(dict(settings.pop()), f"encoder {canonical} (as open_clip's weights for it are "
                               f"prepared; a config file of this name with a preprocess_cfg of its own replaces "
                               f"that)", size) or None


def canonical_model_name(name: str) -> str:
    """open_clip's name for ``name``; accepts the OpenAI spellings (``ViT-B/32``, ``ViT-L/14@336px``), which
    name OpenAI's models, so their QuickGELU config (``ViT-B-32-quickgelu``): open_clip's plain ``ViT-B-32``
    is the GELU one of LAION's and DataComp's weights, and OpenAI's weights load into it without an error."""
    import open_clip

    register_model_configs()
    known = open_clip.list_models()
    if name in known:
        return name
    candidate = re.sub(r"@(\d+)px$", r"-\1", name).replace("/", "-")
    openai = candidate != name  # OpenAI's spelling names OpenAI's model, which computes with QuickGELU
    if openai and candidate in known and not quick_gelu_of(candidate) and f"{candidate}-quickgelu" in known:
        return f"{candidate}-quickgelu"
    if candidate in known:
        return candidate
    close = difflib.get_close_matches(candidate, known, n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ParError(f"unknown encoder {name!r}{hint} (add a JSON config under configs/models/ or a folder named by $PAR_MODEL_CONFIGS for a new one)")


# the torch.nn.init functions that modules' constructors and open_clip's init_parameters call
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _without_random_init():
    """torch.nn.init's functions leave their tensor as it is while modules are built: the random draws of a
    model whose every weight a strict load then overwrites are wasted (half of loading RN50 or ViT-B-32)."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def quick_gelu_of(canonical: str) -> bool:
    """Whether encoder ``canonical`` computes with QuickGELU: its config says so (``-quickgelu``), or every
    pretrained weight open_clip knows for it was trained with it (RN50, RN101, ViT-L-14-336: OpenAI's, and
    YFCC's and CC12M's ResNets), as open_clip builds them when it loads those weights. Where they differ
    (ViT-B-32: OpenAI's QuickGELU, LAION's GELU) the name's own config holds: GELU."""
    import open_clip

    if (open_clip.get_model_config(canonical) or {}).get("quick_gelu"):
        return True
    tags = open_clip.list_pretrained_tags_by_model(canonical)
    return bool(tags) and all(open_clip.get_pretrained_cfg(canonical, tag).get("quick_gelu", False) for tag in tags)


def create_model(name: str, device: str | torch.device = "cpu", initialise: bool = True) -> torch.nn.Module:
    """A randomly initialised open_clip model (weights come from ``load_weights``). ``initialise=False``
    skips the random draws, leaving the weights undefined: only for a model whose weights are loaded next."""
    import open_clip

    canonical = canonical_model_name(name)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded: that is the point
    try:
        with _without_random_init() if not initialise else contextlib.nullcontext():
            model = open_clip.create_model(canonical, pretrained=None, device=device,
                                           force_quick_gelu=quick_gelu_of(canonical),
                                           force_preprocess_cfg=preprocess_of(canonical))
    finally:
        logger.setLevel(level)
    model.par_model_name = canonical
    return model


def has_vision_tower(name: str) -> bool:
    """Whether encoder ``name``'s config describes an image tower (``vision_cfg``), without building it."""
    import open_clip

    config = open_clip.get_model_config(canonical_model_name(name))
    return bool(config and config.get("vision_cfg"))


def get_tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(canonical_model_name(name))


def config_image_size(name: str) -> int:
    """The input size of encoder ``name`` from its config, without building it (open_clip's default 224)."""
    import open_clip

    size = ((open_clip.get_model_config(canonical_model_name(name)) or {}).get("vision_cfg") or {}).get("image_size")
    size = size or 224
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def image_mean_std(model: torch.nn.Module):
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))


def _read_checkpoint_file(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ParError(f"cannot read safetensors checkpoint {path}: {e}") from None
    import pickle
    import warnings
    import zipfile

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            # a zip checkpoint is mapped, not read: reading its metadata or a few tensors costs no copy of it all
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # the weights-only unpickler met something other than tensors and plain data
        with open(path, "rb") as f:
            head = f.read(2)
        if "Unsupported operand" in str(e) and not head.startswith((b"PK", b"\x80")):  # no zip, no pickle header:
            raise ParError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or a truncated or corrupt one "
                           f"(not a pickle stream)") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"an object of type {found.group(1)}" if found else "pickled Python objects"
        raise ParError(f"{path} is not a safe checkpoint: it holds {what}, not only tensors and plain values, and "
                       "par never unpickles code from a checkpoint (it is untrusted input); save the weights as a "
                       "state dict of tensors or as .safetensors") from None
    except Exception as e:  # RuntimeError/EOFError/KeyError...: not a torch file, or a truncated one
        if _is_torchscript(path):
            raise ParError(f"{path} is a TorchScript archive (the format of OpenAI's original CLIP downloads): it "
                           "holds code, and par never runs code from a checkpoint (it is untrusted input); give the "
                           "same weights as a state dict: open_clip's hub copy as .safetensors (OpenAI's ViT-B/32: "
                           "timm/vit_base_patch32_clip_224.openai), or, for a file you trust, "
                           "torch.save(torch.jit.load(PATH).state_dict(), NEW_PATH)") from None
        first = re.split(r"(?<=\.)\s", str(e).strip(), maxsplit=1)[0] if str(e).strip() else ""
        detail = f" ({type(e).__name__}: {first})" if first and "weights_only" not in first else f" ({type(e).__name__})"
        raise ParError(f"cannot read checkpoint {path}: not a PyTorch checkpoint, or a truncated or corrupt one"
                       f"{detail}") from None


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` beside the weights, as
    ``torch.jit.save`` writes), told from its file list alone."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ParError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise ParError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The state dict of tensors in a checkpoint file, whatever its layout.

    Accepts bare state dicts (OpenAI's too), ``{"state_dict": ...}`` (with or without DDP's ``module.``
    prefix, plus any other entries such as ``epoch`` or ``optimizer``) and ``.safetensors``.
    """
    path = _checkpoint_path(path)
    return _state_of(_read_checkpoint_file(path), path)


def _state_of(obj, path: Path) -> Dict[str, torch.Tensor]:
    """``load_checkpoint``'s state dict from what the file held."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ParError(f"{path} holds no state dict (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ParError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    for wrapper in ("module.", "_orig_mod."):  # saved from a DDP and / or torch.compile wrapper, in that order
        if all(k.startswith(wrapper) for k in obj):
            obj = {k[len(wrapper):]: v for k, v in obj.items()}
    # OpenAI's state dicts carry three scalars beside the weights (open_clip drops them too when it builds a model)
    return {k: v for k, v in obj.items() if not (k in OPENAI_SCALARS and v.ndim == 0)}


def read_metadata(path: str | os.PathLike) -> dict:
    """The plain entries saved beside the weights (``model``, ``step``, ...); ``{}`` when there are none."""
    path = _checkpoint_path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise ParError(f"cannot read safetensors checkpoint {path}: {e}") from None
    return _metadata_of(_read_checkpoint_file(path))


def _metadata_of(obj) -> dict:
    """``read_metadata``'s entries from what a torch checkpoint file held."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return {}
    return {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, (str, int, float, bool))}


def _describe(keys, limit=6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_finite(state: Dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuses weights holding NaN or inf (a diverged run): such a model still ranks classes, so its
    accuracy would look like a number; the error names the first such tensor."""
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ParError(f"checkpoint {path} holds non-finite weights (NaN or inf): first in {key} "
                               f"({bad} of {tensor.numel()} values); a diverged or damaged run, refused")


def architecture(name: str) -> str:
    """Encoder ``name``'s architecture, whatever its activation (``ViT-B/32`` and ``ViT-B-32``: ``ViT-B-32``)."""
    return canonical_model_name(name).removesuffix("-quickgelu")


def same_encoder(first: str, second: str) -> bool:
    """Whether two encoder names build the same model: one architecture with one activation (``ViT-L-14-336``
    computes with QuickGELU as ``ViT-L-14-336-quickgelu`` does)."""
    return (architecture(first) == architecture(second)
            and quick_gelu_of(canonical_model_name(first)) == quick_gelu_of(canonical_model_name(second)))


def check_saved_encoder(saved, name: str, path: str | os.PathLike) -> None:
    """Refuses checkpoint ``path`` when the encoder its metadata names (``saved``) is not ``name``: encoders of
    the same weights' shapes (``ViT-B-32`` with GELU, ``ViT-B-32-quickgelu``) load into each other without a key
    mismatch, and compute something else. A checkpoint naming no encoder, or one unknown here, is left to the
    key check."""
    try:
        saved_canonical = canonical_model_name(saved) if isinstance(saved, str) and saved else None
    except ParError:
        return
    if saved_canonical is None or same_encoder(saved_canonical, name):
        return
    activations = {quick_gelu_of(saved_canonical), quick_gelu_of(canonical_model_name(name))}
    hint = (" (they differ in their activation, GELU and QuickGELU: OpenAI's spellings, ViT-B/32, name OpenAI's "
            "QuickGELU models; give the encoder the checkpoint was saved as)" if len(activations) == 2 else "")
    raise ParError(f"checkpoint {path} holds a {saved} model, not {canonical_model_name(name)}{hint}")


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Loads ``path`` into ``model`` strictly; any key mismatch is an error naming the keys, and so is a
    checkpoint saved for another encoder (``check_saved_encoder``)."""
    path = _checkpoint_path(path)
    obj = _read_checkpoint_file(path)  # once: the metadata and the weights come from the one read
    if getattr(model, "par_model_name", None):
        saved = read_metadata(path) if path.suffix == ".safetensors" else _metadata_of(obj)  # a header read
        check_saved_encoder(saved.get("model"), model.par_model_name, path)
    state = _state_of(obj, path)
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys (checkpoint vs model): {_describe(misshaped, 3)}")
    if problems:
        name = getattr(model, "par_model_name", type(model).__name__)
        raise ParError(f"checkpoint {path} does not match encoder {name}: " + "; ".join(problems))
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    return model


def load_model(name: str, checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Encoder ``name`` with the weights of ``checkpoint``, in eval mode."""
    model = create_model(name, initialise=False)
    load_weights(model, checkpoint)  # strict: every weight is overwritten, or it raises
    return model.to(device).eval()


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Writes ``{"state_dict", "model", **metadata}`` (or a safetensors file) atomically.

    ``metadata`` must hold plain values (str/int/float/bool/lists/dicts) so that the file
    stays loadable with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(metadata or {})
    meta.setdefault("model", getattr(model, "par_model_name", None))
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        text_meta = {k: str(v) for k, v in meta.items() if v is not None}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=text_meta))
    return atomic_save({"state_dict": state, **meta}, path)
