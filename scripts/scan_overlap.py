"""Does an inverted trigger sit on the planted patch? A patch backdoor planted at several fixed places, each
poisoned model's trigger inverted, and the share of the mask that lies on the planted patch measured.

    python scripts/scan_overlap.py [--config configs/micro-backdoor.yaml] [--out runs/overlap-micro]
                                   [--attack badnet_rs] [--patch-size N] [--places 22,22;4,4;...]
                                   [--scanners decree-text,...] [--images clean] [--stamp-at 0,0;...]

Per place (rows/columns of the patch's top-left pixel): the profile's poisoning with the patch fixed there,
its clean accuracy and ASR, then
* ``toward-target``: Neural Cleanse toward the planted label (``par.scan.trigger_toward``: the smallest mask
  found that sends 99 % of the shadow images to the label, what ``invert`` unlearns with ``trigger_from:
  target``), the best case for a scanner, which is told the target;
* each of ``--scanners``: the trigger its scan shows (``trigger.png``).
For each trigger: its size (mean mask), the share of the mask's mass on the planted patch and that share
over the patch's share of the image (1 = no better than a uniform mask), and how many of the mask's
largest pixels, as many as the patch has, fall on the patch, and the mask's centre of mass. Writes
``overlap.csv`` and ``overlap.md`` in --out. The places are a grid fixed in advance, not chosen by the result.

With ``--stamp-at``, each poisoned model is also evaluated with its own patch stamped at each of those places
(``stamped.csv``, ``stamped.md``: the ASR per planted and stamped place). Where the backdoor fires about as well
away from its place, the checkpoint hardly says where it was planted, and an inversion cannot be expected to find it.
"""
import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from par.app import pipeline
from par.app.profile import Profile
from par.config import build, load_yaml
from par.errors import ParError
from par.scan import ScanConfig, mask_place, scan_checkpoint, trigger_toward
from par.synthetic import WorldConfig

STAMPED_COLUMNS = ["planted", "stamped", "asr"]
COLUMNS = ["place", "asr", "ca", "trigger", "size", "patch_share", "over_uniform", "top_pixels_on_patch", "centre",
           "seconds"]


def patch_overlap(mask: torch.Tensor, top: int, left: int, size: int) -> dict:
    """How much of ``mask`` (``[1, H, W]`` or ``[H, W]``, non-negative) lies on the ``size`` x ``size`` patch at
    (``top``, ``left``): its share of the mask's mass, that share over the patch's share of the image, and
    the fraction of the mask's ``size**2`` largest pixels that fall on the patch, and the mask's centre of
    mass ("row,column"): the same centre at every planted place is a trigger the patch did not decide."""
    mask = mask.detach().float().reshape(mask.shape[-2:])
    height, width = mask.shape
    if not (0 <= top <= height - size and 0 <= left <= width - size):
        raise ParError(f"a {size}-px patch at ({top}, {left}) does not fit a {height} x {width} mask")
    on_patch = torch.zeros_like(mask, dtype=torch.bool)
    on_patch[top:top + size, left:left + size] = True
    total = float(mask.sum())
    share = float(mask[on_patch].sum()) / total if total > 0 else 0.0
    largest = mask.flatten().topk(size * size).indices
    place = mask_place(mask)
    centre = f"{place['centre'][0]:.1f},{place['centre'][1]:.1f}" if place else ""
    return {"patch_share": share, "over_uniform": share / (size * size / (height * width)),
            "top_pixels_on_patch": float(on_patch.flatten()[largest].float().mean()), "centre": centre}


def parse_places(text: str, option: str = "--places") -> list:
    try:
        places = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        places = []
    if not places or any(len(p) != 2 or min(p) < 0 for p in places):
        raise ParError(f"{option} must be 'top,left;top,left;...' of whole numbers >= 0, got {text!r}")
    return places


def measure_place(base: dict, configs: Path, out: Path, attack: str, patch: int, place: tuple, scanners: list,
                  images: str, stamp_at: list = ()) -> tuple:
    """The rows of one place: the poisoned model built (or reused) with the patch fixed at ``place``, then
    every trigger's overlap; and the model's ASR with its patch stamped at each of ``stamp_at``."""
    params = dict(Profile.from_mapping(base, str(configs)).attack_params.get(attack) or {})
    params.update(patch_size=patch, top=place[0], left=place[1])
    profile = Profile.from_mapping({**base, "attack": attack, "attack_params": {attack: params}}, str(configs))
    world = pipeline.make_world_stage(profile, out)
    model, _, metrics, _ = pipeline.build_poisoned(profile, out, world, attack)
    stamped = [{"planted": f"{place[0]},{place[1]}", "stamped": f"{top},{left}",
                 "asr": pipeline.evaluate_stage(world, model.checkpoint, attack, profile.label,
                                                {**params, "top": top, "left": left}, profile.eval)["asr_top1"]}
               for top, left in stamp_at]
    shadow = world.path / f"{images}.csv"
    scan = ScanConfig(checkpoint=str(model.checkpoint), model=world.model, images=str(shadow),
                      classnames=str(world.path / "classnames.txt"), templates=str(world.path / "templates.txt"),
                      progress=False)
    common = {"place": f"{place[0]},{place[1]}", "asr": metrics["asr_top1"], "ca": metrics["clean_top1"]}
    rows = []
    started = time.time()
    trigger, _ = trigger_toward(scan, profile.label)
    if trigger is not None:
        rows.append({**common, "trigger": "toward-target", "size": trigger.size, "seconds": time.time() - started,
                     **patch_overlap(trigger.mask, *place, patch)})
    for scanner in scanners:
        started = time.time()
        result = scan_checkpoint(replace(scan, scanner=scanner))
        shown = result.trigger
        rows.append({**common, "trigger": f"{scanner} ({result.verdict}, {result.target or result.details.get('top_label')})",
                     "size": float(shown.mask.mean()), "seconds": time.time() - started,
                     **patch_overlap(shown.mask.expand(1, *shown.pattern.shape[-2:]), *place, patch)})
    return rows, stamped


def write_stamped(out: Path, rows: list, note: str) -> str:
    """The ASR of each planted place's model with its patch stamped at each place asked: one row per planted
    place, one column per stamped place."""
    with open(out / "stamped.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STAMPED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    stamped = list(dict.fromkeys(r["stamped"] for r in rows))
    asr = {(r["planted"], r["stamped"]): r["asr"] for r in rows}
    lines = [note, "", "ASR (%) with the planted patch stamped at (row, column):", "",
             "| planted at | " + " | ".join(stamped) + " |", "|---|" + "---|" * len(stamped)]
    for planted in dict.fromkeys(r["planted"] for r in rows):
        lines.append(f"| {planted} | " + " | ".join(f"{100 * asr[planted, s]:.0f}" for s in stamped) + " |")
    text = "\n".join(lines) + "\n"
    (out / "stamped.md").write_text(text)
    return text


def write(out: Path, rows: list, note: str) -> str:
    with open(out / "overlap.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [note, "", "| place | ASR | trigger | size | mass on patch | x uniform | largest pixels on patch | "
             "mask centre | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['place']} | {100 * r['asr']:.1f} | {r['trigger']} | {100 * r['size']:.2f} % | "
                     f"{100 * r['patch_share']:.1f} % | {r['over_uniform']:.1f} | {100 * r['top_pixels_on_patch']:.0f} % "
                     f"| {r['centre']} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "overlap.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/micro-backdoor.yaml")
    parser.add_argument("--out", default="runs/overlap-micro")
    parser.add_argument("--attack", default="badnet_rs", help="a patch attack with `top`, `left`, `patch_size`")
    parser.add_argument("--patch-size", type=int, help="default: the profile's patch_size for the attack")
    parser.add_argument("--places", default="2,2;2,12;2,22;12,2;12,12;12,22;22,2;22,12;22,22",
                        help="'top,left;...' (default: a 3 x 3 grid of the 32-px micro images)")
    parser.add_argument("--scanners", default="label-inversion,decree", help="comma-separated; '' for none")
    parser.add_argument("--images", default="clean", help="the world's split whose images are the shadow images")
    parser.add_argument("--stamp-at", default="", help="'top,left;...': also the ASR of each model's patch stamped "
                                                       "at these places (stamped.md)")
    args = parser.parse_args(argv)
    try:
        config = Path(args.config)
        base = load_yaml(str(config))
        profile = Profile.load(config)  # what the profile says once what it extends is read
        out = Path(args.out)
        patch = args.patch_size or int((profile.attack_params.get(args.attack) or {}).get("patch_size", 0))
        if patch < 1:
            raise ParError(f"no patch_size for {args.attack!r} in {config}: give --patch-size")
        places = parse_places(args.places)
        stamp_at = parse_places(args.stamp_at, "--stamp-at") if args.stamp_at else []
        size = build(WorldConfig, profile.world, "profile 'world'").image_size
        for top, left in places + stamp_at:  # checked before any model is built
            if max(top, left) + patch > size:
                raise ParError(f"a {patch}-px patch at ({top}, {left}) does not fit the world's {size}-px images")
        out.mkdir(parents=True, exist_ok=True)
        scanners = [s for s in args.scanners.split(",") if s]
        stamp = f" --stamp-at '{args.stamp_at}'" if stamp_at else ""
        note = (f"`python scripts/scan_overlap.py --config {args.config} --attack {args.attack} --patch-size {patch}"
                f" --places '{args.places}'{stamp} --scanners '{args.scanners}'`: a {patch}-px patch toward "
                f"`{profile.label}`, sizes in % of the image")
        rows, stamped = [], []
        for place in places:  # the tables rewritten after each place: a long run's finished places are kept
            print(f"== {args.attack} {patch} px at {place}", flush=True)
            found, asr = measure_place(base, config.resolve().parent, out, args.attack, patch, place, scanners,
                                       args.images, stamp_at)
            rows, stamped = rows + found, stamped + asr
            text = write(out, rows, note)
            if stamp_at:
                text += "\n" + write_stamped(out, stamped, note)
    except ParError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
