"""One scan of one checkpoint into its own folder (``python -m par scan``, the scan table, ``invert``).

The folder gets ``scan.json`` (verdict, statistic, threshold and its source, per-label statistics,
target, trigger family, seconds, settings), ``labels.csv`` (one row per inverted label and trigger
family), ``trigger.png`` (the trigger alone and stamped on some of the images) and
``trigger.safetensors`` (the trigger itself, as ``invert: {trigger: FILE}`` takes it). ``scan.json`` is
written last: a folder holding it holds a finished scan. A finished scan is reused by an identical
request (same checkpoint and image digests, same settings) and any other request for that folder is
refused, naming what differs; nothing is overwritten.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import List, Optional, Tuple

from par.errors import ParError
from par.scan import ScanConfig, ScanResult, check, scan_checkpoint, scan_request
from par.scan.base import finite_number
from par.scan.files import TRIGGER_FILE, save_trigger
from par.utils import atomic_write, atomic_write_text, check_output_dir, digest, to_pil

RECORD, LABELS, PICTURE = "scan.json", "labels.csv", "trigger.png"
WRITING = "scan.writing.json"  # the request whose files are being written: its leftovers are a run's own
LABEL_COLUMNS = ("label", "family", "size", "lift", "pull", "z_lift", "z_pull", "z", "share", "success", "seconds",
                 "reference")
SCORE_COLUMNS = ("z", "gap", "share")  # what a scanner's per-label rows are ranked by, the first a row has
TILE = 96  # the smallest side a tile of trigger.png is drawn at (32-px images are upscaled, pixels kept sharp)


def _plain(value):
    """``value`` with non-finite floats as None, so that scan.json stays JSON."""
    if isinstance(value, float):
        return finite_number(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record_of(result: ScanResult, request: dict) -> dict:
    trigger = result.trigger
    return _plain({
        "scanner": result.scanner, "verdict": result.verdict, "statistic": result.statistic, "value": result.value,
        "threshold": result.threshold, "flagged_when": f"{result.direction} the threshold",
        "threshold_source": result.threshold_source, "target": result.target, "family": result.family,
        "trigger": {"family": trigger.family, "label": trigger.label, "size": trigger.size,
                    "place": trigger.place} if trigger else None,
        "labels": result.labels, "details": result.details, "seconds": round(result.seconds, 2),
        "seconds_per_label": result.seconds_per_label, "config": {k: v for k, v in result.settings.items()
                                                                 if k != "progress"},
        "settings": request,
    })


def _labels_csv(rows: List[dict]) -> str:
    buffer = io.StringIO()
    own = [c for c in dict.fromkeys(k for row in rows for k in row) if c != "index"]  # a scanner's own columns
    columns = [c for c in LABEL_COLUMNS if c in own] + [c for c in own if c not in LABEL_COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=columns or LABEL_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def draw_trigger(result: ScanResult, path: Path) -> Path:
    """The mask, the trigger alone (its pattern where the mask is, on white) and, beside them, up to 8
    clean images above the same images stamped with the trigger."""
    from PIL import Image, ImageDraw

    trigger, images = result.trigger, result.examples
    side = images.shape[-1]
    tile = max(TILE, side)
    label_h = 16

    def up(image):
        return to_pil(image).resize((tile, tile), Image.NEAREST)

    columns = 2 + images.shape[0]
    grid = Image.new("RGB", (tile * columns, 2 * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    mask, pattern = trigger.mask.clamp(0, 1), trigger.pattern.clamp(0, 1)
    alone = mask * pattern + (1 - mask)
    stamped = trigger.apply(images).clamp(0, 1)
    for col, (title, image) in enumerate([("mask", mask.expand(3, -1, -1)), ("trigger", alone)]):
        draw.text((col * tile + 4, 2), title, fill="black")
        grid.paste(up(image), (col * tile, label_h))
    for i in range(images.shape[0]):
        x = (2 + i) * tile
        grid.paste(up(images[i]), (x, label_h))
        grid.paste(up(stamped[i]), (x, 2 * label_h + tile))
    draw.text((2 * tile + 4, 2), "clean images", fill="black")
    headline = f"{result.scanner}: {result.verdict}" + (f", target {result.target}" if result.target else "")
    draw.text((4, tile + label_h + 2), f"{headline} ({trigger.family} trigger, size {trigger.size:.3g})", fill="black")
    return atomic_write(path, grid.save)


def request_of(cfg: ScanConfig, checked=None) -> dict:
    """``scan_request`` as scan.json holds it (JSON's types). It hashes the checkpoint and the images: a
    caller naming a folder by it hands it on to ``run_scan`` rather than have it made twice."""
    return json.loads(json.dumps(scan_request(cfg, checked)))


def run_scan(cfg: ScanConfig, out, request: Optional[dict] = None, checked=None) -> Tuple[dict, bool]:
    """(scan.json's record, whether it was reused) for ``cfg`` in folder ``out``; ``request``: ``request_of(cfg)``
    and ``checked``: ``check(cfg)``, when the caller has them (checking resolves every image path listed)."""
    folder = check_output_dir(out, "scan folder")
    checked = checked or check(cfg)  # every setting and input, before the checkpoint is hashed for the request
    request = request if request is not None else request_of(cfg, checked)
    record_path = folder / RECORD
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
            old = record["settings"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ParError(f"scan folder {folder} has an unreadable {RECORD} ({type(e).__name__}); choose another --out")
        if old == request:
            return record, True
        differs = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
        raise ParError(f"scan folder {folder} holds a scan of another request (differs in {differs}); choose "
                       "another --out")
    leftovers = [name for name in (LABELS, PICTURE, TRIGGER_FILE) if (folder / name).exists()]
    if leftovers and _writing(folder) == request:  # this request's scan, stopped while writing its files
        for name in leftovers:
            (folder / name).unlink()
    elif leftovers:
        raise ParError(f"scan folder {folder} holds {leftovers} but no {RECORD} (not written by a finished scan); "
                       "choose another --out")
    result = scan_checkpoint(cfg, checked)
    record = record_of(result, request)
    text, labels = json.dumps(record, indent=2) + "\n", _labels_csv(result.labels)  # before any file is written
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / WRITING, json.dumps(request) + "\n")  # first: what the files below belong to
    atomic_write_text(folder / LABELS, labels)
    if result.trigger is not None and result.examples is not None:
        draw_trigger(result, folder / PICTURE)
        size = result.examples.shape[-2:]
        save_trigger(folder / TRIGGER_FILE, result.trigger.mask.expand(1, *size).clamp(0, 1),
                     result.trigger.pattern.expand(3, *size).clamp(0, 1))
    atomic_write_text(record_path, text)  # last: a folder with it holds a finished scan
    (folder / WRITING).unlink()
    return record, False


def _writing(folder: Path) -> Optional[dict]:
    """The request a scan stopped while writing its files in ``folder`` was for; None where there is none."""
    try:
        return json.loads((folder / WRITING).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def scan_folder(root, request: dict) -> Path:
    """``root/scan-<scanner>-<digest of the request>``: where a scan is kept beside what it scanned, one name
    per request, so the scan table and ``invert`` asking the same of one checkpoint share one scan."""
    return Path(root) / folder_name(request)


def folder_name(request: dict) -> str:
    """``scan-<scanner>-<digest of the request>`` for a request made by ``request_of``."""
    return f"scan-{request['scanner']}-{digest(request)}"


def summary(record: dict, out) -> List[str]:
    """The lines ``python -m par scan`` prints."""
    target = f": target {record['target']!r} ({record['family']} trigger)" if record["target"] else ""
    lines = [f"scan ({record['scanner']}): {record['verdict']}{target}; {record['statistic']} "
             f"{record['value']:.3g}, flagged {record['flagged_when']} {record['threshold']:.3g}",
             f"  threshold: {record['threshold_source']}"]
    score = next((c for c in SCORE_COLUMNS if any(c in r for r in record["labels"])), None)
    rows = sorted(record["labels"], key=lambda r: -(r.get(score) or 0))[:5]
    if rows:
        shown = ("size", "lift", "pull", "z", "share", "success", "collapse_cosine", "nearest_image_cosine", "gap")
        columns = [c for c in shown if all(isinstance(r.get(c), (int, float)) for r in rows)]
        lines.append(f"  {'label':<16} {'family':<6} " + " ".join(f"{c:>7}" for c in columns))
        lines += [f"  {r['label']:<16} {r.get('family', ''):<6} " + " ".join(f"{r[c]:>7.3g}" for c in columns)
                  for r in rows]
    trigger = record.get("trigger")
    if trigger and trigger.get("place"):
        (top, left, bottom, right), centre = trigger["place"]["box"], trigger["place"]["centre"]
        toward = f" toward {trigger['label']!r}" if trigger.get("label") else ""
        lines.append(f"  trigger.png: a {trigger['family']} trigger{toward} (size {trigger['size']:.3g}) at rows "
                     f"{top}-{bottom}, columns {left}-{right} (centre {centre[0]:g}, {centre[1]:g})")
    per_label = record.get("seconds_per_label")
    cost = f"{per_label:.2f} s per label, " if per_label else ""
    lines.append(f"  {cost}{record['seconds']:.1f} s in all")
    written = [RECORD, LABELS] + [name for name in (PICTURE, TRIGGER_FILE) if (Path(out) / name).exists()]
    lines.append("written: " + ", ".join(str(Path(out) / name) for name in written))
    return lines
