"""Poisoning an image-caption CSV (docs/PAR-NOTES.md section 4).

N rows are drawn at random; their images get the trigger and their captions become a
random zero-shot template filled with the target label ("a photo of a banana.").
Every poisoned row's trigger is drawn from its own seed, recorded in the manifest, so
each trigger instance can be redrawn later. The manifest is written last: its presence
means the output is complete. The trigger is stamped on the picture the encoder sees (resized and
centre-cropped to ``size``), as evaluation stamps it; without ``size`` the images must already be one
square size.
"""
from __future__ import annotations

import functools
import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from par import attacks
from par.data import (caption_column, eval_transform, image_paths, load_templates, mentions_label, open_image,
                      read_csv, to_float)
from par.errors import ParError
from par.utils import atomic_write, atomic_write_text, check_output_dir, file_digest, to_pil


@dataclass
class PoisonConfig:
    csv: str
    attack: str
    label: str
    out: str
    rate: Optional[float] = None
    num: Optional[int] = None
    seed: int = 0
    image_root: Optional[str] = None
    templates: str = "openai"
    size: Optional[int] = None  # resize + centre-crop to the model's input size before triggering
    attack_params: dict = field(default_factory=dict)  # e.g. {"patch_size": 8}
    label_consistent: bool = False  # poison only rows whose caption names the label; keep their captions

    def __post_init__(self):
        """Settings checked where they live, before any file is read or written."""
        if (self.rate is None) == (self.num is None):
            raise ParError("give exactly one of --rate and --num")
        if self.rate is not None and (isinstance(self.rate, bool) or not isinstance(self.rate, numbers.Real)
                                      or not 0 < self.rate <= 1):
            raise ParError(f"--rate must be in (0, 1], got {self.rate!r}")
        for name, low in (("num", 1), ("size", 1), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
                raise ParError(f"poison {name} must be a whole number of at least {low}, got {value!r}")
        if not isinstance(self.label, str) or not self.label.strip():
            raise ParError(f"the target label must be a class name, got {self.label!r}")
        attacks.get_trigger(self.attack, **self.attack_params)  # a known attack, with sound parameters


def _caption_templates(spec: str):
    return [t if callable(t) else t.format for t in load_templates(spec)]


def rebuild(manifest: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> Path:
    """Re-creates a poisoned dataset from its manifest: same rows, same trigger draws, same bytes."""
    path = Path(manifest)
    if not path.is_file():
        raise ParError(f"manifest not found: {path}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        settings = dict(manifest["settings"])
        digest = settings.pop("csv_digest")
        inputs = dict(manifest.get("inputs") or {})  # absent from manifests written before it was kept
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ParError(f"{path} is not a poisoning manifest (written by python -m par poison)") from None
    settings.pop("num_rows", None)
    if settings.get("rate") is not None:
        settings["num"] = None
    unknown = sorted(set(settings) - ({f.name for f in fields(PoisonConfig)} - {"out"}))
    if unknown:
        raise ParError(f"manifest {path} holds settings this version does not know: {unknown}")
    for key, found in inputs.items():  # read where they were, whatever the folder the rebuild runs from
        if key == "templates":
            settings["templates"] = found["path"]
        else:
            settings["attack_params"] = {**settings["attack_params"], key.split(".", 1)[1]: found["path"]}
    cfg = PoisonConfig(out=str(out), **settings)
    if not Path(cfg.csv).is_file() or file_digest(cfg.csv) != digest:
        raise ParError(f"{cfg.csv} is missing or differs from the CSV the manifest was made from")
    for key, found in inputs.items():
        if not Path(found["path"]).is_file() or file_digest(found["path"]) != found["digest"]:
            raise ParError(f"{found['path']} ({key}) is missing or differs from the file the manifest was made from")
    return poison(cfg, progress=progress, any_size=True)  # the manifest's images, whatever their sizes


def input_files(cfg: PoisonConfig) -> dict:
    """The files beside the CSV that the poisoned dataset is made from, by absolute path and digest: a trigger
    read from a file (BadCLIP's patch) and a templates file. A rebuild reads them there and checks their bytes."""
    files = {f"attack_params.{k}": v for k, v in cfg.attack_params.items() if isinstance(v, str) and Path(v).is_file()}
    if cfg.templates != "openai" and Path(cfg.templates).is_file():
        files["templates"] = cfg.templates
    return {key: {"path": str(Path(path).resolve()), "digest": file_digest(path)} for key, path in files.items()}


def same_poisoning(manifest: dict, settings: dict, inputs: dict) -> bool:
    """Whether a manifest describes the poisoning of ``settings`` and ``inputs``: its input files compared by
    their bytes, not where they lie (the CSV by its digest, a templates or trigger file by its own), so a folder
    moved with what it was made from is still the same poisoning. A manifest written before it kept its input
    files is compared by its settings alone, paths included."""
    if "inputs" not in manifest:
        return manifest.get("settings") == settings
    digests = lambda found: {k: v.get("digest") for k, v in found.items()}  # noqa: E731
    if digests(manifest["inputs"]) != digests(inputs):
        return False

    def located(values: dict) -> dict:  # the settings less the paths of files known by their digest
        kept = {k: v for k, v in values.items() if k != "csv" and not (k == "templates" and "templates" in inputs)}
        by_digest = {k.split(".", 1)[1] for k in inputs if k.startswith("attack_params.")}
        kept["attack_params"] = {k: v for k, v in (values.get("attack_params") or {}).items() if k not in by_digest}
        return kept

    return located(manifest.get("settings") or {}) == located(settings)


def _check_one_square_size(paths, rows, progress: bool) -> None:
    """Refuses, asking for ``--size``, images of ``rows`` not all one square size (a dataset already at the
    encoder's input size, as the synthetic world's, needs none). Evaluation stamps
    the trigger on the resized, centre-cropped picture the encoder sees (docs/PAR-NOTES.md section 3), so
    one stamped on a photo at its own resolution would be another trigger after the resize: a BadNet patch
    shrunk or cropped away, a blend's noise smoothed, WaNet's field rescaled. Only the headers are read."""
    import warnings

    from tqdm import tqdm

    sizes = {}
    for row in tqdm(rows, desc="poison: image sizes", unit="img", leave=False, disable=not progress):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image's limits apply
                with Image.open(paths[row]) as img:
                    size = img.size
        except Exception:  # the decoding error, worded as everywhere else, before anything is written
            size = open_image(paths[row]).size
        sizes.setdefault(size, row)
        if len(sizes) > 1 or size[0] != size[1]:
            (width, height), first = next(iter(sizes.items()))
            seen = f"{width}x{height} at row {first}" + (f" and {size[0]}x{size[1]} at row {row}" if len(sizes) > 1 else "")
            raise ParError(f"the images to poison are not all one square size ({seen}): give --size, the encoder's "
                           f"input size (224 for most CLIP encoders, 336 for ViT-L/14@336px), so the trigger is "
                           f"stamped on the picture the encoder sees, as evaluation stamps it")


def poison(cfg: PoisonConfig, reuse: bool = False, progress: bool = True, any_size: bool = False) -> Path:
    """The poisoned dataset in ``cfg.out`` (its CSV's path). Without ``cfg.size`` the images must already be one
    square size (``_check_one_square_size``); ``any_size`` lifts that check for a rebuild of a manifest written
    before it existed."""
    from tqdm import tqdm

    trigger = attacks.get_trigger(cfg.attack, **cfg.attack_params)
    out = check_output_dir(cfg.out, "poisoned dataset folder")
    frame = read_csv(cfg.csv, ["image", "caption"])
    captions = caption_column(frame, cfg.csv)
    if cfg.label_consistent:
        eligible = np.array([i for i, c in enumerate(captions) if mentions_label(c, cfg.label)], dtype=np.int64)
        what = f"rows whose caption mentions {cfg.label!r}"
    else:
        eligible = np.arange(len(frame))
        what = "rows"
    num = cfg.num if cfg.num is not None else int(round(cfg.rate * len(frame)))
    if num < 1 and cfg.rate is not None:
        raise ParError(f"rate {cfg.rate} of the {len(frame)} rows of {cfg.csv} poisons no row; raise the rate or give --num")
    if not 1 <= num <= len(eligible):
        raise ParError(f"cannot poison {num} rows: {cfg.csv} has {len(eligible)} eligible {what}")
    templates = _caption_templates(cfg.templates)

    manifest_path = out / "manifest.json"
    settings = {**asdict(cfg), "num": num, "attack": trigger.name, "csv_digest": file_digest(cfg.csv)}
    settings.pop("out")
    for key in ("csv", "image_root", "templates"):  # absolute, so that the manifest rebuilds from anywhere
        if settings[key] and Path(settings[key]).exists():
            settings[key] = str(Path(settings[key]).resolve())
    inputs = input_files(cfg)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if reuse and same_poisoning(old, settings, inputs):
            return out / "poisoned.csv"
        raise ParError(f"{out} already holds a poisoned dataset; choose another --out" + ("" if reuse else " or pass --reuse"))
    paths = image_paths(frame, cfg.csv, cfg.image_root)
    real = functools.lru_cache(maxsize=None)(os.path.realpath)  # a folder's real path, once per folder

    def real_path(p) -> str:
        return os.path.join(real(os.path.dirname(os.path.abspath(p))), os.path.basename(p))

    if real_path(cfg.csv) == real_path(out / "poisoned.csv"):
        raise ParError(f"{out} would overwrite the CSV being poisoned ({cfg.csv}); choose another --out")
    inside = next((p for p in paths if os.path.dirname(real_path(p)) == real_path(out / "images")), None)
    if inside is not None:
        raise ParError(f"{out}/images holds images being poisoned ({inside}), which poisoning writes over; choose "
                       "another --out")
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(eligible, size=num, replace=False))
    if not cfg.size and not any_size:
        _check_one_square_size(paths, rows.tolist(), progress)
    resize = eval_transform(cfg.size) if cfg.size else None
    made = [d for d in (out, out / "images") if not d.exists()]  # removed again if poisoning fails
    (out / "images").mkdir(parents=True, exist_ok=True)
    # relative to the folder as the system resolves it (a --out through a link: ".." is taken from its target)
    images_out = [os.path.relpath(real_path(p), real(str(out.absolute()))) for p in paths]
    records, written = [], []
    try:
        for row in tqdm(rows.tolist(), desc=f"poison ({trigger.name})", unit="img", disable=not progress):
            img = open_image(paths[row])
            x = resize(img) if resize else torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
            triggered = trigger.apply_rows(to_float(x[None]), cfg.seed, [row])[0]
            name = f"images/{row:07d}.png"
            to_pil(triggered).save(out / name)
            written.append(out / name)
            images_out[row] = name
            if not cfg.label_consistent:
                captions[row] = templates[int(rng.integers(len(templates)))](cfg.label)
            records.append({"row": row, "seed": attacks.row_seed(cfg.seed, row), "caption": captions[row]})
    except BaseException:  # a bad image or an interrupt: no half-poisoned folder is left to be mistaken for one
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(made):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise

    import pandas as pd

    poisoned = frame.copy()
    poisoned["image"] = images_out
    poisoned["caption"] = captions
    # rows poisoned before (a CSV poisoned again, by another attack) stay marked: detection scores against it
    earlier = (pd.to_numeric(frame["poisoned"], errors="coerce").fillna(0) != 0 if "poisoned" in frame.columns
               else np.zeros(len(frame), dtype=bool))
    marked = np.asarray(earlier, dtype=bool).copy()
    marked[rows] = True
    poisoned["poisoned"] = marked.astype(int)
    csv_out = atomic_write(out / "poisoned.csv", lambda tmp: poisoned.to_csv(tmp, index=False))
    manifest = {"settings": settings, "trigger": {"name": trigger.name, "params": trigger.params()},
                "num_rows": len(frame), "poisoned": records, "inputs": inputs}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return csv_out
