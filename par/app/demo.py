"""The offline demo of ``bash trigger.sh``: world -> poison -> poisoned CLIP -> PAR -> CA/ASR.

The world, the poisoned data and the poisoned model are reused when they were built with
the same settings; the cleaning and the evaluation run again every time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from par import attacks
from par.app import pipeline
from par.app.profile import Profile
from par.defenses import DEFENSES
from par.errors import ParError
from par.runs import timestamped_folder
from par.synthetic import CLASS_NAMES


def format_table(rows) -> str:
    lines = [f"{'model':<12}{'CA top-1':>10}{'ASR top-1':>11}", "-" * 33]
    for name, metrics in rows:
        lines.append(f"{name:<12}{100 * metrics['clean_top1']:>9.1f}%{100 * metrics['asr_top1']:>10.1f}%")
    return "\n".join(lines)


def link_world(world: Path, link: Path) -> None:
    """``OUT/world`` leads to the demo's world where that lies in the shared cache: ``trigger_validate.sh`` reads
    its test split there when given no evaluation data. A world of an earlier run kept there is left alone."""
    if link.is_symlink() and link.resolve() != world.resolve():
        link.unlink()
    if not link.exists() and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(world.resolve(), target_is_directory=True)


def run_demo(profile: Profile | str | os.PathLike, out: str, attack: Optional[str] = None, label: Optional[str] = None,
             defense: Optional[str] = None) -> dict:
    """Runs the demo of ``profile`` (a Profile, or its YAML file); the arguments override its choices."""
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    attack = attacks.TRIGGERS.canonical(attack or profile.attack)
    label = label or profile.label
    if label not in CLASS_NAMES:
        raise ParError(f"target label {label!r} is not a class of the synthetic world ({', '.join(CLASS_NAMES)})")
    attack_params = dict(profile.attack_params.get(attack) or {})
    out = Path(out)
    started = time.time()

    defense = DEFENSES.canonical(defense or profile.defense)
    attacks.get_trigger(attack, **attack_params)  # validate before any training
    pipeline.check_defense(profile, defense, dict(profile.clean))  # before the world is drawn

    world = pipeline.make_world_stage(profile, out)
    link_world(world.path, out / "world")
    attack_params = pipeline.prepare_attack_stage(profile, out, world, attack, label, attack_params)
    poisoned = pipeline.poisoned_model_stage(profile, out, world, attack, label, attack_params)
    clean_values = dict(profile.clean)
    run_dir = timestamped_folder(out, f"cleaned-{attack}")
    cleaned = pipeline.clean_stage(world, defense, poisoned, clean_values, run_dir, reuse=False)

    results = {}
    for name, ckpt in (("poisoned", poisoned.checkpoint), (defense.upper(), cleaned)):
        results[name] = pipeline.evaluate_stage(world, ckpt, attack, label, attack_params, profile.eval)
    report = {"attack": attack, "label": label, "attack_params": attack_params, "defense": defense,
              "poisoned_checkpoint": str(poisoned.checkpoint),
              "cleaned_checkpoint": str(cleaned), "results": results, "seconds": round(time.time() - started, 1)}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{attacks.get_trigger(attack, **attack_params).paper_name} backdoor (target '{label}'), "
          f"{len(CLASS_NAMES)}-class synthetic world")
    print(format_table(results.items()))
    print(f"report: {run_dir / 'report.json'} ({report['seconds']:.0f} s)")
    return report
