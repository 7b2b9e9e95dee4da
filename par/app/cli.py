"""``par`` / ``python -m par``: thin commands over the library.

Problems with the user's input end as one ``error: ...`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import List, Optional

from par.errors import ParError


def parse_key_values(pairs: List[str], option: str = "--attack-param") -> dict:
    """Repeated ``KEY=VALUE`` options as a mapping, each value read as YAML (``steps=60`` is a number)."""
    import yaml

    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ParError(f"{option} takes KEY=VALUE, got {pair!r}")
        if key in params:
            raise ParError(f"{option} {key} given twice")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParError(f"{option} {key}: cannot read {value!r} as a value") from None
    return params


def _given(args, *names: str) -> dict:
    """The options the user gave (argparse default ``None``): the rest fall through to the config
    dataclass's own defaults, the one place each default lives."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _names(registry) -> str:
    """Every registered name (plugins included), for an option's help."""
    from par.plugins import load_plugins

    load_plugins()
    return " | ".join(registry.in_order())


def cmd_world(args) -> None:
    from par.synthetic import WorldConfig, make_world

    cfg = WorldConfig(seed=args.seed, image_size=args.image_size, train=args.train, clean=args.clean,
                      test=args.test, workers=args.workers, style=args.style)
    out = make_world(cfg, args.out, reuse=args.reuse)
    print(f"world in {out}: train.csv ({cfg.train}), clean.csv ({cfg.clean}), test.csv ({cfg.test}), classnames.txt")


def cmd_poison(args) -> None:
    from par.attacks.poison import PoisonConfig, poison, rebuild

    if args.from_manifest:  # the manifest holds every setting: others given beside it would be silently unused
        given = [f"--{k.replace('_', '-')}" for k in ("csv", "attack", "label", "rate", "num", "seed", "image_root",
                                                       "templates", "size", "classnames", "attack_param")
                 if getattr(args, k) is not None]
        given += [f"--{k.replace('_', '-')}" for k in ("label_consistent", "reuse") if getattr(args, k)]
        if given:
            raise ParError(f"--from-manifest rebuilds the dataset its manifest describes; {', '.join(given)} "
                           "cannot change it (leave them out)")
        print(f"rebuilt poisoned CSV: {rebuild(args.from_manifest, args.out)}")
        return
    missing = [f"--{n}" for n in ("csv", "attack", "label") if not getattr(args, n)]
    if missing or (args.rate is None and args.num is None):
        raise ParError(f"poison needs {', '.join(missing + (['--rate or --num'] if args.rate is None and args.num is None else []))}")

    cfg = PoisonConfig(csv=args.csv, attack=args.attack, label=args.label, out=args.out, rate=args.rate,
                       num=args.num, seed=0 if args.seed is None else args.seed, image_root=args.image_root,
                       templates=args.templates or "openai",
                       size=args.size, attack_params=parse_key_values(args.attack_param),
                       label_consistent=args.label_consistent)
    if args.classnames:
        from par.data import read_lines

        if args.label not in read_lines(args.classnames, "class names"):
            raise ParError(f"target label {args.label!r} is not a class in {args.classnames}")
    print(f"poisoned CSV: {poison(cfg, reuse=args.reuse)}")


def cmd_train(args, overrides: List[str]) -> None:
    from par.config import load_yaml, merge, parse_overrides
    from par.train import train, train_config

    values = merge(load_yaml(args.config) if args.config else {}, parse_overrides(overrides))
    train(train_config(values), reuse=args.reuse, resume=args.resume)


def cmd_clean(args, overrides: List[str]) -> None:
    from par import models
    from par.config import load_yaml, merge, parse_overrides
    from par.defenses import DEFENSES, CleaningJob, clean
    from par.defenses.base import for_objective

    settings = load_yaml(args.config) if args.config else {}
    written_for = settings.pop("model", None)  # a recipe names its encoder: it must be the one cleaned
    if written_for is not None and models.architecture(written_for) != models.architecture(args.model):  # one budget
        raise ParError(f"{args.config} is a recipe for {written_for}, not for {args.model}")
    if args.defense is None:  # a recipe's objective names its defense (a CleanCLIP recipe cleans with CleanCLIP)
        recipe = settings.get("objective")
        if recipe is not None and recipe not in DEFENSES:
            raise ParError(f"{args.config} trains objective {recipe!r}, which is no defense: name one with --defense")
        args.defense = DEFENSES.canonical(recipe) if recipe is not None else "par"
    objective = DEFENSES.get(args.defense).objective
    if objective:  # a settings file written for another objective lends its budget; its objective_params
        own = for_objective(settings, objective)  # are not this one's, while the options given here are
        if own.keys() != settings.keys() - {"objective"}:
            print(f"{args.config}: written for objective {settings['objective']!r}; its objective_params are not "
                  f"used by defense {args.defense!r}")
        settings = own
    settings = merge(settings, parse_overrides(overrides))
    for key in ("model", "train_data", "init_checkpoint", "out", "image_root"):
        if key in settings:
            raise ParError(f"clean: give {key} as its own option, not as a setting")
    job = CleaningJob(checkpoint=args.checkpoint, model=args.model, train_data=args.train_data, out=args.out,
                      settings=settings, image_root=args.image_root, poisoned_data=args.poisoned_data,
                      classnames=args.classnames, templates=args.templates, reuse=args.reuse, resume=args.resume)
    print(f"cleaned checkpoint ({args.defense}): {clean(args.defense, job)}")


def _eps_list(text: Optional[str]) -> List[float]:
    from par.eval.robust import parse_eps

    return [parse_eps(part, "--robust-eps") for part in (text or "").split(",") if part.strip()]


def cmd_eval(args) -> None:
    from par.eval.zeroshot import EvalConfig, evaluate, format_records

    robust = {}
    unused = [f"--{k.replace('_', '-')}" for k in ("robust_attacks", "robust_steps", "robust_max_images",
                                                   "robust_batch_size") if getattr(args, k) is not None]
    if unused and not args.robust_eps:  # else they would be taken and silently not used
        raise ParError(f"{', '.join(unused)} set how robust accuracy is measured: give --robust-eps too")
    if args.robust_eps:
        robust = {"robust_eps": _eps_list(args.robust_eps),
                  **_given(args, "robust_steps", "robust_max_images", "robust_batch_size")}
        if args.robust_attacks is not None:
            robust["robust_attacks"] = [a for a in args.robust_attacks.split(",") if a.strip()]
    from par.config import build

    cfg = build(EvalConfig, {**robust, **_given(args, "checkpoint", "model", "data", "classnames", "templates",
                                                 "image_root", "retrieval_json", "retrieval_root", "attack", "label",
                                                 "seed", "batch_size", "workers", "device", "out"),
                             "attack_params": parse_key_values(args.attack_param)}, "eval options")
    if args.dry_run:
        evaluate(cfg, dry_run=True)
        tasks = [task for task, on in (("classification", cfg.data), ("retrieval", cfg.retrieval_json)) if on]
        attack = f", attack {cfg.attack} -> {cfg.label}" if cfg.attack else ""
        print(f"eval inputs check out ({' and '.join(tasks)}{attack}); nothing evaluated")
        return
    if not cfg.data:
        print("classification: skipped (no --data)")
    if not cfg.retrieval_json:
        print("retrieval: skipped (no --retrieval-json)")
    print(format_records(evaluate(cfg)))
    if args.out:
        print(f"results appended to {args.out}")


def cmd_detect(args) -> None:
    from par.config import build
    from par.defenses.eftclip.detection import VICTIM_Z, DetectConfig, detect

    values = _given(args, "checkpoint", "model", "data", "classnames", "out", "oracle", "clean_data", "oracle_cache",
                    "image_root", "templates", "label", "theta", "object_list_size", "calibrate", "device",
                    "batch_size", "workers")
    if args.views is not None:
        values["views"] = [v for v in args.views.split(",") if v]
    summary = detect(build(DetectConfig, {**values, "oracle_params": parse_key_values(args.oracle_param)},
                           "detect options"))
    strength = (f"z {summary['victim_z']}: " + ("significant" if summary["victim_significant"] else
                f"weak evidence, below {VICTIM_Z}")) if summary["victim"] else "no label flagged more than predicted"
    print(f"flagged {summary['flagged']} of {summary['rows']} pairs; victim label: {summary['victim']} ({strength})")
    blind = summary.get("oracle_blind_to") or []
    if blind:
        print(f"  the oracle cannot see {len(blind)} of the classes ({', '.join(blind[:3])}{', ...' if len(blind) > 3 else ''}): "
              f"{summary['unjudged_claims']} claims on them were not judged, and a victim among them cannot be found")
    calibration = summary.get("calibration")
    print(f"  predicted flags per label: its flag rate on {calibration['pairs']} held-out clean pairs"
          if calibration else "  predicted flags per label: the overall flag rate (not calibrated on clean pairs)")
    for v in summary["victims"]:
        print(f"  {v['label']:<16} flagged claims {v['flagged_claims']:>6} of {v['claims']:>6}  "
              f"excess {v['excess']:>8} (z {v['z']})")
    for key, value in (summary.get("metrics") or {}).items():
        print(f"  {key}: {value if value is None or isinstance(value, int) else round(value, 4)}")
    print(f"detections: {args.out}/detections.csv, summary: {args.out}/summary.json")


def cmd_scan(args) -> None:
    from par.scan.folder import run_scan, summary
    from par.config import build
    from par.scan import ScanConfig

    values = _given(args, "checkpoint", "model", "images", "scanner", "classnames", "templates", "top_k", "max_images",
                    "threshold", "image_root", "seed", "device", "precision")
    if args.labels is not None:
        values["labels"] = [label.strip() for label in args.labels.split(",")]
    values["scanner_params"] = parse_key_values(args.scanner_param, "--scanner-param")
    record, reused = run_scan(build(ScanConfig, values, "scan options"), args.out)
    if reused:
        print(f"reusing the finished scan in {args.out} (same checkpoint, images and settings)")
    print("\n".join(summary(record, args.out)))


def cmd_shards(args) -> None:
    from par.shards import write_shards

    written = write_shards(args.csv, args.out, args.image_root, args.shard_size)
    pattern = f"{args.out}/{{00000..{len(written) - 1:05d}}}.tar" if len(written) > 1 else str(written[0])
    print(f"wrote {len(written)} shards; train on them with train_data: '{pattern}'")


def cmd_shell_env(args) -> None:
    """A YAML file of settings as shell assignments that keep variables already set: the scripts'
    settings files are read (and refused) here, by one parser, not by the shell."""
    import shlex

    from par.config import load_yaml

    values = load_yaml(args.config)
    known = [k.strip().upper() for k in args.keys.split(",") if k.strip()]
    lines = []
    for key, value in values.items():
        name = str(key).upper()
        if known and name not in known:
            raise ParError(f"{args.config}: unknown key {key!r}; known: {', '.join(k.lower() for k in known)}")
        if value is None or value == "" or value == [] or value == {}:
            raise ParError(f"{args.config}: key {key!r} has no value")
        items = ([f"{a}={b}" for a, b in value.items()] if isinstance(value, dict) else
                 value if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value) else None)
        if items is not None:  # KEY=VALUE items (attack_params): separate words, or lines where a value holds a space
            text = ("\n" if any(any(c.isspace() for c in item) for item in items) else " ").join(items)
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)  # values (robust radii): one comma-separated value
        else:
            text = str(value)
        lines.append(f'[ -n "${{{name}:-}}" ] || {name}={shlex.quote(text)}')
    print("\n".join(lines))


def cmd_demo(args) -> None:
    from par.app.demo import run_demo

    run_demo(args.profile, args.out, attack=args.attack, label=args.label, defense=args.defense)


def cmd_badclip(args) -> None:
    from par.attacks.badclip import BadCLIPConfig, make_badclip_patch

    from par.config import build

    make_badclip_patch(build(BadCLIPConfig, _given(
        args, "checkpoint", "model", "data", "label", "out", "image_root", "templates", "patch_size", "steps",
        "batch_size", "lr", "seed", "device"), "badclip options"))


def cmd_triggers(args) -> None:
    from par.gallery import trigger_gallery

    params = parse_key_values(args.attack_param)
    print(f"gallery: {trigger_gallery(args.image, args.out, size=args.size, seed=args.seed, params=params)}")


def cmd_bench(args) -> None:
    from par.app.bench import run_bench

    split = lambda text: [x for x in text.split(",") if x] if text else None  # noqa: E731
    run_bench(args.config, args.out, quick=args.quick, attacks=split(args.attacks), defenses=split(args.defenses),
              report=args.report, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    from par.defenses import DEFENSES
    from par.defenses.eftclip.oracles import ORACLES
    from par.scan import SCANNERS

    parser = argparse.ArgumentParser(prog="par", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="write the synthetic image-caption world")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=20000, help="image-caption pairs for (poisoned) pre-training")
    p.add_argument("--clean", type=int, default=5000, help="clean pairs for cleaning")
    p.add_argument("--test", type=int, default=1200, help="labelled test images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="keep an identical world already in --out")
    p.add_argument("--style", default="photo",
                   help="photo (the world) | sketch | cartoon (other renderers: cleaning data 'without real data')")

    p = sub.add_parser("poison", help="poison an image,caption CSV with a trigger")
    p.add_argument("--csv")
    p.add_argument("--attack")
    p.add_argument("--label", help="target label, e.g. banana")
    p.add_argument("--out", required=True)
    p.add_argument("--from-manifest", metavar="MANIFEST", help="rebuild a poisoned dataset from its manifest.json")
    p.add_argument("--label-consistent", action="store_true",
                   help="poison only rows whose caption already names the label, keeping their captions")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--rate", type=float)
    group.add_argument("--num", type=int)
    p.add_argument("--seed", type=int, help="the rows' and the triggers' draws (default 0)")
    p.add_argument("--image-root")
    p.add_argument("--templates", help="'openai' (default) or a file of '{}' caption templates")
    p.add_argument("--size", type=int, help="resize and centre-crop images to the encoder's input size (e.g. 224) "
                                            "before triggering, as evaluation does; needed unless the images are all "
                                            "one square size already")
    p.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="trigger parameter, e.g. patch_size=8")
    p.add_argument("--classnames", help="class-names file the label must belong to")
    p.add_argument("--reuse", action="store_true")

    p = sub.add_parser("train", allow_abbrev=False, help="pre-train or clean a CLIP: --config FILE [--key value ...]")
    p.add_argument("--config")
    p.add_argument("--reuse", action="store_true", help="keep a finished identical run in the same folder")
    p.add_argument("--resume", metavar="latest|STATE", help="continue an interrupted run from its latest saved state")

    p = sub.add_parser("clean", allow_abbrev=False,
                       help="clean a poisoned checkpoint with a defense: --defense NAME [--key value ...]")
    p.add_argument("--defense", help=f"registered defense: {_names(DEFENSES)} (plugins' too); default: the one the "
                                     "--config recipe's objective names, else par")
    p.add_argument("--checkpoint", required=True, help="the poisoned checkpoint")
    p.add_argument("--model", required=True, help="its encoder (open_clip name or OpenAI spelling)")
    p.add_argument("--train-data", required=True,
                   help="the defender's clean pairs: an image,caption CSV, a class-folder tree or a shard pattern")
    p.add_argument("--image-root")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="training settings (steps, batch, lr, objective_params, ...)")
    p.add_argument("--poisoned-data", help="the poisoned training CSV, for defenses that detect in it")
    p.add_argument("--classnames", help="the label space, for defenses that reason in labels (eftclip): file or imagenet")
    p.add_argument("--templates", default="openai", help="'openai' or a file of '{}' templates")
    p.add_argument("--reuse", action="store_true", help="keep a finished identical run in the same folder")
    p.add_argument("--resume", metavar="latest|STATE", help="continue an interrupted run from its latest saved state")

    p = sub.add_parser("eval", help="zero-shot CA/ASR and retrieval recall/ASR of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", help="classification data: image,label CSV or class-folder tree")
    p.add_argument("--classnames", help="'imagenet' (default) or a file with one class name per line")
    p.add_argument("--templates", help="'openai' (default) or a file of '{}' templates")
    p.add_argument("--image-root", help="folder the CSV's image paths are relative to")
    p.add_argument("--retrieval-json", help="retrieval annotations: JSON list of {image, caption: [...]}")
    p.add_argument("--retrieval-root", help="folder the retrieval image paths are relative to")
    p.add_argument("--attack")
    p.add_argument("--label")
    p.add_argument("--attack-param", action="append", metavar="KEY=VALUE")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", help="auto (default) | cpu | cuda")
    p.add_argument("--out", help="JSONL results file (one record per evaluation is appended)")
    p.add_argument("--robust-eps", metavar="EPS[,EPS...]",
                   help="robust accuracy at these L-inf radii, e.g. 1/255,2/255,4/255 (pixels in [0, 1])")
    p.add_argument("--robust-attacks", help="attacks, run as a cascade (torchattacks; default apgd-ce,apgd-t)")
    p.add_argument("--robust-steps", type=int, help="iterations per attack (default 100)")
    p.add_argument("--robust-max-images", type=int, help="robust accuracy on the first N images (default 1000)")
    p.add_argument("--robust-batch-size", type=int,
                   help="images attacked at once (default --batch-size; ~1 GB of device memory each for ViT-L/14@336px)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every input (data, class names, label, trigger, --out) and stop: nothing is loaded "
                        "from the checkpoint, which need not exist yet, and nothing is written")

    p = sub.add_parser("detect", help="EftCLIP: flag pairs where the poisoned CLIP and an oracle disagree")
    p.add_argument("--checkpoint", required=True, help="the poisoned checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="image,caption CSV to screen (the poisoned training set)")
    p.add_argument("--classnames", required=True, help="the label space: file, or imagenet")
    p.add_argument("--out", required=True, help="folder for detections.csv and summary.json")
    p.add_argument("--oracle", help=f"registered oracle: {_names(ORACLES)} (default world-classifier)")
    p.add_argument("--oracle-param", action="append", metavar="KEY=VALUE", help="oracle setting, e.g. weights=PATH")
    p.add_argument("--clean-data", help="clean image,caption pairs a learning oracle learns from (never --data)")
    p.add_argument("--oracle-cache", help="folder of trained oracles, shared by detections (default: OUT/oracles)")
    p.add_argument("--image-root")
    p.add_argument("--templates")
    p.add_argument("--label", help="the attack's target, when known: reported as found or not")
    p.add_argument("--theta", type=float, help="confidence at which a claim counts (default 0.66)")
    p.add_argument("--object-list-size", type=int, help="length of the oracle's object list (EftCLIP's tau; default 3)")
    p.add_argument("--views", help="claims compared with the oracle: clip, caption or both (default clip,caption)")
    p.add_argument("--calibrate", type=float,
                   help="share of --clean-data held out of the oracle to measure each label's flag rate on clean "
                        "pairs (default 0.2; 0: rank labels against the overall flag rate)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 256)")
    p.add_argument("--workers", type=int, help="image-decoding processes (default 0: in the main process)")
    p.add_argument("--device")

    p = sub.add_parser("scan", help="is a checkpoint backdoored? invert triggers on a few clean images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", required=True, help="its encoder (open_clip name or OpenAI spelling)")
    p.add_argument("--images", required=True,
                   help="clean unlabelled images: a CSV with an 'image' column, or a folder of image files")
    p.add_argument("--out", required=True, help="folder for scan.json, labels.csv and trigger.png")
    p.add_argument("--scanner", help=f"registered scanner: {_names(SCANNERS)} (default label-inversion)")
    p.add_argument("--scanner-param", action="append", metavar="KEY=VALUE",
                   help="scanner setting, e.g. steps=60 (see the scanner's Params)")
    p.add_argument("--classnames", help="the label space: 'imagenet' (default) or a file with one name per line")
    p.add_argument("--templates", help="'openai' (default) or a file of '{}' templates")
    p.add_argument("--labels", help="comma-separated candidate labels (default: every class name)")
    p.add_argument("--top-k", type=int, help="labels inverted in full after the ranking pass (default 10)")
    p.add_argument("--max-images", type=int, help="shadow images used (default 128; a seeded sample when more)")
    p.add_argument("--threshold", type=float, help="flag at this statistic instead of the scanner's documented one")
    p.add_argument("--image-root", help="folder the CSV's image paths are relative to (default: the CSV's)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default) | cpu | cuda")
    p.add_argument("--precision", help="auto (default: bf16 autocast on CUDA, fp32 on the CPU) | fp32 | amp | amp_bf16")

    p = sub.add_parser("badclip", help="optimise a BadCLIP patch against a (clean) CLIP")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="image,caption CSV of clean pairs")
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True, help="patch PNG; apply with --attack badclip --attack-param patch=PATH")
    p.add_argument("--image-root")
    p.add_argument("--templates")
    p.add_argument("--patch-size", type=int)
    p.add_argument("--steps", type=int, help="optimisation steps (default 200)")
    p.add_argument("--batch-size", type=int, help="images per step (default 64)")
    p.add_argument("--lr", type=float, help="Adam's learning rate (default 0.01)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device")

    p = sub.add_parser("triggers", help="draw an image clean and under every trigger, side by side")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attack-param", action="append", metavar="NAME.KEY=VALUE",
                   help="parameter for one trigger, e.g. badclip.patch=patch.png")

    p = sub.add_parser("shards", help="write image-caption pairs as webdataset shards (open_clip's jpg/txt)")
    p.add_argument("--csv", required=True, help="image,caption CSV (a label column becomes .cls members)")
    p.add_argument("--out", required=True, help="a new folder for 00000.tar, ... and sizes.json")
    p.add_argument("--image-root")
    p.add_argument("--shard-size", type=int, default=2000, help="pairs per shard (default 2000: 125 shards for 250k pairs, enough for 8 processes x 12 loader workers, each of which reads whole shards)")

    p = sub.add_parser("shell-env", help="print a YAML settings file as shell assignments (trigger_validate.sh's "
                                         "VALIDATE_CONFIG); variables already set are kept")
    p.add_argument("config", help="YAML mapping of keys to values")
    p.add_argument("--keys", default="", help="comma-separated known keys; any other key is an error")

    p = sub.add_parser("bench", help="every attack against every defense on the synthetic world")
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="the config's quick subset")
    p.add_argument("--attacks", help="comma-separated subset of attacks")
    p.add_argument("--defenses", help="comma-separated subset of defenses")
    p.add_argument("--report", default="results", help="stem of the result files (REPORT.csv, REPORT.md): a side "
                                                      "profile shares --out with the main one, reusing its cells")
    p.add_argument("--jobs", type=int, help="models (poisoned ones, clean controls, cells) trained at once, each a "
                                        "process of one thread (default: the profile's jobs, 1); with more than 1 "
                                        "they are other models (their arithmetic runs in another order), kept in "
                                        "folders of their own")

    p = sub.add_parser("demo", help="offline demo: world, poison, poisoned CLIP, PAR, CA/ASR table")
    p.add_argument("--profile", default="configs/demo.yaml")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--attack")
    p.add_argument("--label")
    p.add_argument("--defense", help="registered defense (default: the profile's, else par)")
    return parser


def _one_line(error: ParError) -> str:
    """The message alone, also when a DataLoader worker wrapped it in its traceback."""
    text = str(error).strip()
    marker = "ParError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1]
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "clean"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in ("train", "clean"):
            {"train": cmd_train, "clean": cmd_clean}[args.command](args, rest)
        else:
            {"world": cmd_world, "poison": cmd_poison, "eval": cmd_eval, "demo": cmd_demo,
             "badclip": cmd_badclip, "triggers": cmd_triggers, "bench": cmd_bench,
             "detect": cmd_detect, "shards": cmd_shards, "shell-env": cmd_shell_env, "scan": cmd_scan}[args.command](args)
    except ParError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """The ``par`` command and ``python -m par``: ``main``, then exit. Everything still alive is frozen out of
    the garbage collector first, so the interpreter's last full collection at exit does not walk torch's
    millions of objects (about a second per command; files are closed by then and memory goes back anyway)."""
    code = main()
    gc.freeze()
    sys.exit(code)
