"""The offline demo of ``bash trigger.sh``: world -> poison -> poisoned CLIP -> PAR -> CA/ASR.

Each stage lands in a folder named by a digest of everything it depends on, so a
re-run reuses what was already built with the same settings (the world, the poisoned
data, the poisoned model) and only cleans and evaluates again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from par.config import build, load_yaml
from par.errors import ParError

REPO = Path(__file__).resolve().parent.parent


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stage_config(spec, what: str) -> dict:
    """A stage's settings: inline mapping, or a YAML path (relative to the repo)."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, str):
        path = Path(spec)
        return load_yaml(path if path.is_absolute() or path.exists() else REPO / path)
    raise ParError(f"profile key {what!r} must be a mapping or a YAML file path")


def format_table(rows) -> str:
    lines = [f"{'model':<12}{'CA top-1':>10}{'ASR top-1':>11}", "-" * 33]
    for name, metrics in rows:
        lines.append(f"{name:<12}{100 * metrics['clean_top1']:>9.1f}%{100 * metrics['asr_top1']:>10.1f}%")
    return "\n".join(lines)


def run_demo(profile_path: str, out: str, attack: Optional[str] = None, label: Optional[str] = None) -> dict:
    from par import triggers
    from par.evaluate import EvalConfig, evaluate, merged_metrics
    from par.poison import PoisonConfig, poison
    from par.synthetic import CLASS_NAMES, WorldConfig, make_world
    from par.train import TrainConfig, train

    profile = load_yaml(profile_path)
    attack = triggers.TRIGGERS.canonical(attack or profile.get("attack", "badnet_rs"))
    label = label or profile.get("label", "banana")
    if label not in CLASS_NAMES:
        raise ParError(f"target label {label!r} is not a class of the synthetic world ({', '.join(CLASS_NAMES)})")
    attack_params = profile.get("attack_params") or {}
    triggers.get_trigger(attack, **attack_params)  # validate before any work
    out = Path(out)
    started = time.time()

    world_cfg = build(WorldConfig, profile.get("world", {}), "profile 'world'")
    world = make_world(world_cfg, out / "world", reuse=True)

    poison_values = {"rate": 0.05, "seed": 0, **profile.get("poison", {})}
    poison_key = _digest(asdict(world_cfg), attack, label, attack_params, poison_values)
    poison_cfg = build(PoisonConfig, {
        "csv": str(world / "train.csv"), "attack": attack, "label": label, "out": str(out / f"poison-{attack}-{poison_key}"),
        "templates": str(world / "templates.txt"), "attack_params": attack_params, **poison_values,
    }, "profile 'poison'")
    poisoned_csv = poison(poison_cfg, reuse=True)

    pretrain_values = _stage_config(profile.get("pretrain", {}), "pretrain")
    pretrain_key = _digest(poison_key, pretrain_values)
    pretrain_cfg = build(TrainConfig, {
        **pretrain_values, "train_csv": str(poisoned_csv), "out": str(out / f"poisoned-{attack}-{pretrain_key}"),
    }, "profile 'pretrain'")
    poisoned_ckpt = train(pretrain_cfg, reuse=True)

    clean_values = _stage_config(profile.get("clean", {}), "clean")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    clean_cfg = build(TrainConfig, {
        "model": pretrain_cfg.model, **clean_values, "train_csv": str(world / "clean.csv"),
        "init_checkpoint": str(poisoned_ckpt), "out": str(out / f"cleaned-{attack}-{stamp}"),
    }, "profile 'clean'")
    cleaned_ckpt = train(clean_cfg)

    results = {}
    for name, ckpt in (("poisoned", poisoned_ckpt), (clean_cfg.objective.upper(), cleaned_ckpt)):
        records = evaluate(EvalConfig(
            checkpoint=str(ckpt), model=pretrain_cfg.model, data=str(world / "test.csv"),
            classnames=str(world / "classnames.txt"), templates=str(world / "templates.txt"),
            attack=attack, label=label, attack_params=attack_params, out=str(Path(ckpt).parent / "results.jsonl"),
            **profile.get("eval", {}),
        ))
        results[name] = merged_metrics(records)
    report = {"attack": attack, "label": label, "poisoned_checkpoint": str(poisoned_ckpt),
              "cleaned_checkpoint": str(cleaned_ckpt), "results": results, "seconds": round(time.time() - started, 1)}
    (Path(cleaned_ckpt).parent / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{triggers.get_trigger(attack).paper_name} backdoor (target '{label}'), {len(CLASS_NAMES)}-class synthetic world")
    print(format_table(results.items()))
    print(f"report: {Path(cleaned_ckpt).parent / 'report.json'} ({report['seconds']:.0f} s)")
    return report
