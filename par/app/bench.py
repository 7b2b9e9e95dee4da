"""The benchmark: every attack against every defense on the synthetic world.

For each attack a poisoned tiny CLIP is built (or reused, keyed by its settings); each
defense cleans it under the same data and step budget (and optionally over a sweep of one
setting and several seeds); every cell is evaluated for CA and ASR. Cells are cached by
their settings, so re-running resumes; a cell that fails is recorded with its error and the
others go on. Outputs: ``results.csv``, ``results.md``, ``tradeoff.png``, ``triggers.png``.
"""
from __future__ import annotations

import csv
import json
import dataclasses
import functools
import os
import re
import statistics
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

from par.attacks import TRIGGERS, get_trigger
from par.app import pipeline, scanbench, workers
from par.app.profile import Profile, check_jobs, check_named_once
from par.config import merge
from par.defenses import DEFENSES
from par.errors import ParError
from par.gallery import trigger_gallery
from par.eval.robust import eps_label
from par.utils import digest

FIELDS = ["attack", "defense", "setting", "seed", "poisoned_ca", "poisoned_asr", "poisoned_asr_top5", "ca", "asr",
          "asr_top5", "train_seconds", "status", "error"]  # ca/asr/...: the row's model (cleaned, or never poisoned)


def _fields(robust: Optional[dict], defenses: List[str]) -> List[str]:
    """``FIELDS`` plus, with robust evaluation, ``poisoned_robust@<eps>`` and ``robust@<eps>``, and the
    columns the defenses report about themselves (``Defense.report_fields``)."""
    labels = [eps_label(e) for e in (robust or {}).get("robust_eps", [])]
    extra = [f"poisoned_robust@{e}" for e in labels] + [f"robust@{e}" for e in labels]
    reported = list(dict.fromkeys(f for d in defenses for f in DEFENSES.get(d).report_fields))
    return FIELDS[:-2] + extra + reported + FIELDS[-2:]


def _defense_settings(profile: Profile, name: str) -> dict:
    """The shared cleaning budget (``clean``) with this defense's own settings on top (dotted keys nest)."""
    base = dict(profile.clean)
    specific = profile.defense_settings.get(name) or {}
    if "objective_params" in specific:  # a defense's objective settings replace the shared ones, which
        base.pop("objective_params", None)  # are then no other objective's (see defenses.base.for_objective)
        base.pop("objective", None)
    return merge(base, specific)


def check_cells(profile: Profile, attacks: List[str], defenses: List[str], sweeps: dict) -> None:
    """What every cell will read, checked before the world is drawn or a model trained: the target label,
    each attack's parameters, and each defense's settings under every sweep value."""
    pipeline.check_attacks(profile, attacks)
    if profile.scan is not None:
        scanbench.check_scanners(profile)
    for defense in defenses:
        default = _defense_settings(profile, defense)
        overrides = [{}] + [{key: value} for key, values in (sweeps.get(defense) or {}).items() for value in values]
        for override in overrides:
            settings = merge(default, override)
            if override and settings == default:
                raise ParError(f"sweep of {defense} {override} is its default setting: that cell is the default "
                               "cell (leave the value out of the sweep)")
            pipeline.check_defense(profile, defense, settings)
        for key, values in (sweeps.get(defense) or {}).items():
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ParError(f"sweep of {defense} lists a value of {key!r} twice: {values!r}")


def _cells(profile: Profile, attacks: List[str], defenses: List[str], seeds: List[int], sweeps: dict,
           synthetic: List[str]):
    """(attack, defense, setting, seed, overrides, cleaning data) for every cell.

    Sweeps run on ``sweep_attacks`` (default: every attack): a trade-off curve per attack
    multiplies the benchmark's cost by the sweep's length.
    """
    swept = profile.sweep_attacks
    for attack in attacks:
        for defense in defenses:
            for seed in seeds:
                yield attack, defense, "default", seed, {}, "world"
            if swept is not None and attack not in swept:
                continue
            for key, values in (sweeps.get(defense) or {}).items():
                for value in values:  # key may be dotted: objective_params.tau
                    yield attack, defense, f"{key.rsplit('.', 1)[-1]}={value}", seeds[0], {key: value}, "world"
        for defense in synthetic:
            for seed in seeds:
                yield attack, defense, "default", seed, {}, "synthetic"


def _row(cell) -> Dict:
    attack, defense, setting, seed, _, data = cell
    label_name = defense + ("-synthetic" if data == "synthetic" else "")
    return {"attack": attack, "defense": label_name, "setting": setting, "seed": seed, "status": "ok", "error": ""}


@dataclasses.dataclass
class _Cell:
    """One cell of the matrix with all it needs, so it can be cleaned and evaluated in another process."""
    profile: Profile
    out: Path
    world: object
    cell: tuple  # (attack, defense, setting, seed, overrides, cleaning data) from _cells
    poisoned: tuple  # build_poisoned's (model, trigger params, metrics, prepared)
    synthetic_csv: Optional[str]
    synthetic_key: Optional[str]
    robust: Optional[dict]
    first_seed: int
    progress: bool
    jobs: int


def _clean_and_evaluate(task: _Cell) -> Dict:
    """The cell's row: clean the poisoned model (or reuse the cell's folder), evaluate it; a failure is
    recorded in the row, not raised, so the other cells go on."""
    attack, defense, setting, seed, override, data = task.cell
    profile, world, label = task.profile, task.world, task.profile.label
    row = _row(task.cell)
    try:
        model, params, poisoned, _ = task.poisoned
        values = merge(_defense_settings(profile, defense), {**override, "seed": seed, "progress": task.progress})
        train_data = task.synthetic_csv if data == "synthetic" else None
        data_key = data if data == "world" else [data, task.synthetic_key]
        # progress bars and logging change no weight: the key leaves them out, so a run with bars reuses the
        # cells of one without
        key = [model.key, defense, pipeline.stage_key(world, values), data_key]
        run_dir = task.out / f"cleaned-{attack}-{row['defense']}-{digest(key)}"
        started = time.time()
        cleaned_ckpt = pipeline.clean_stage(world, defense, model, values, run_dir, reuse=True, train_data=train_data)
        cleaned = pipeline.evaluate_stage(world, cleaned_ckpt, attack, label, params, profile.eval)
        seconds = DEFENSES.get(defense).train_seconds(run_dir)
        row.update(poisoned_ca=poisoned["clean_top1"], poisoned_asr=poisoned["asr_top1"],
                   poisoned_asr_top5=poisoned["asr_top5"], ca=cleaned["clean_top1"],
                   asr=cleaned["asr_top1"], asr_top5=cleaned["asr_top5"],
                   train_seconds=round(time.time() - started, 1) if seconds is None else seconds,
                   **{k: v for k, v in poisoned.items() if k.startswith("poisoned_robust@")})
        if task.robust and setting == "default" and seed == task.first_seed:  # one seed: APGD costs more
            row.update(_robust_columns("", world, cleaned_ckpt, task.robust, profile))
        row.update(DEFENSES.get(defense).report(run_dir, label))
    except workers.stage_errors() as e:  # record the failed cell, go on with the rest
        row.update(status="failed", error=workers.one_line(e))
        if task.progress or task.jobs > 1:
            traceback.print_exc()
    return row


def run_bench(profile: Profile | str | os.PathLike, out: str, quick: bool = False, attacks: Optional[List[str]] = None,
              defenses: Optional[List[str]] = None, progress: bool = True, report: str = "results",
              jobs: Optional[int] = None) -> Path:
    """Runs (or resumes) every cell of ``profile`` (a Profile, or its YAML file). ``report`` is the stem
    of the result files (``<report>.csv``, ``<report>.md``; the plot is ``tradeoff.png``, or
    ``<report>-tradeoff.png`` for another report; the scan table ``scan.csv/.md``, or ``<report>-scan.*``),
    so a subset can reuse the benchmark's cells without overwriting its report."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", report or ""):
        raise ParError(f"bench report must be a file stem (letters, digits, . _ -), got {report!r}")
    if not isinstance(profile, Profile):
        profile = Profile.load(profile)
    if quick:
        profile = profile.quick_profile()
    if jobs is not None:  # the command line's, over the profile's
        check_jobs(jobs, "bench jobs")
        profile = dataclasses.replace(profile, jobs=jobs)
    if profile.jobs > 1:  # models trained side by side take one thread each (Profile.one_thread)
        profile = profile.one_thread()
    label = profile.label
    attacks = [TRIGGERS.canonical(a) for a in (attacks or profile.attacks or TRIGGERS.in_order())]
    every = [d for d in DEFENSES.in_order() if not DEFENSES.get(d).needs_labels]  # the world's pairs have no labels
    chosen = defenses
    defenses = [DEFENSES.canonical(d) for d in (defenses or profile.defenses or every)]
    # the synthetic-data column cleans with the profile's synthetic defenses; a --defenses choice narrows it
    synthetic = profile.synthetic_cleaning
    synthetic_defenses = [DEFENSES.canonical(d) for d in (synthetic.defenses if synthetic else [])
                          if not chosen or DEFENSES.canonical(d) in defenses]
    seeds = list(profile.seeds or [0])
    sweeps = profile.sweeps or {}
    robust = pipeline.robust_settings(profile.robust)
    fields = _fields(robust, defenses + synthetic_defenses)
    check_named_once(attacks, "bench attacks name")
    check_named_once(defenses, "bench defenses name")
    check_cells(profile, attacks, list(dict.fromkeys(defenses + synthetic_defenses)), sweeps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = pipeline.make_world_stage(profile, out)
    synthetic_csv, synthetic_key = None, None
    if synthetic_defenses:
        # a second world of another style, used only as cleaning data; its folder and the cells
        # cleaned with it are keyed by its settings, so changing them never reuses stale cells
        style = dataclasses.replace(profile, world=synthetic.world)
        styled = pipeline.make_world_stage(style, out, folder=f"world-synthetic-{digest(style.world)}")
        synthetic_csv, synthetic_key = str(styled.path / "clean.csv"), styled.key

    rows: List[Dict] = []
    cells = list(_cells(profile, attacks, defenses, seeds, sweeps, synthetic_defenses))
    # every poisoned model first (with the scan table's clean controls beside them), then every cell
    beside = scanbench.control_trainings(profile, out, world) if profile.scan is not None else []
    poisoned_cache: Dict[str, tuple] = {}
    failed: Dict[str, str] = {}  # attack -> why its model could not be built: its cells fail with it
    scan_failed: Dict[str, str] = {}  # attack -> why the table's scans of its model failed: its cells still run
    for attack, (built, error) in pipeline.build_poisoned_models(profile, out, world, attacks, robust, beside).items():
        if error:
            failed[attack] = error
            continue
        poisoned_cache[attack] = built
        if profile.scan is not None:  # the table's scans first: invert reuses its scan of this model
            _, scan_error = workers.attempt(functools.partial(scanbench.scan_models, profile, world,
                                                              scanbench.poisoned_entries({attack: built}), progress))
            if scan_error:
                scan_failed[attack] = scan_error
    tasks = [_Cell(profile, out, world, cell, poisoned_cache[cell[0]], synthetic_csv, synthetic_key, robust,
                   seeds[0], progress and profile.jobs == 1, profile.jobs) for cell in cells if cell[0] not in failed]
    cleaned = workers.each(_clean_and_evaluate, tasks, profile.jobs)
    for cell in cells:  # in the cells' order, each row written as it comes
        if cell[0] in failed:
            row = {**_row(cell), "status": "failed", "error": failed[cell[0]]}
        else:
            row = next(cleaned)
            if profile.jobs > 1:
                print(f"cell {row['attack']} / {row['defense']} / {row['setting']} / seed {row['seed']}: "
                      f"{row['status']}", flush=True)
        rows.append(row)
        _write_results(out / f"{report}.csv", rows, fields)
    next(cleaned, None)  # the workers' pool closes
    reference = profile.reference
    if reference:
        rows += _never_poisoned_rows(profile, out, world, label, poisoned_cache, robust)
        _write_results(out / f"{report}.csv", rows, fields)
    columns = ["never-poisoned"] if reference else []
    columns += list(defenses)
    columns += [d + "-synthetic" for d in synthetic_defenses]
    write_markdown(out / f"{report}.md", rows, attacks, columns, label, robust)
    if profile.scan is not None:  # the scan table: every scanner on the poisoned models and clean controls
        entries = scanbench.poisoned_entries({a: c for a, c in poisoned_cache.items()
                                              if a in attacks and a not in scan_failed})
        stem = "scan" if report == "results" else f"{report}-scan"
        lines = scanbench.write_scan_tables(out, scanbench.scan_rows(profile, out, world, entries, progress), label,
                                            stem)
        if scan_failed:  # said where the table is read: its AUROC and rates are over the other models
            note = ["", "Scans that failed (these poisoned models are left out of the table above):", "",
                    *[f"- `{attack}`: {error}" for attack, error in scan_failed.items()]]
            with (out / f"{stem}.md").open("a") as f:
                f.write("\n".join(note) + "\n")
            lines += note
        with (out / f"{report}.md").open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    _plot_tradeoff(out / ("tradeoff.png" if report == "results" else f"{report}-tradeoff.png"), rows)
    sample = world.path / "images" / "test" / "000001.png"
    gallery_params = {f"{attack}.{k}": v for attack, cached in poisoned_cache.items() for k, v in cached[3].items()}
    # the profile's attacks, beside its report (side profiles sharing --out keep theirs); triggers at their
    # default geometry for the tile (what an attack built, BadCLIP's patch, as built)
    trigger_gallery(sample, out / ("triggers.png" if report == "results" else f"{report}-triggers.png"), size=128,
                    names=attacks, params=gallery_params)
    print(f"benchmark results: {out / f'{report}.md'}")
    failures = sum(row.get("status") == "failed" for row in rows)
    if failures or scan_failed:  # the tables are written; the exit status says the benchmark is not whole
        said = [f"{failures} of {len(rows)} cells failed: their errors are in {out / f'{report}.csv'} (status, error) "
                f"and under 'Failed cells' in {out / f'{report}.md'}"] if failures else []
        said += [f"the scans of {sorted(scan_failed)} failed: left out of the scan table, their errors under it"
                 ] if scan_failed else []
        raise ParError("; ".join(said))
    return out


def _robust_columns(which: str, world, checkpoint, robust: dict, profile: Profile) -> Dict[str, float]:
    accuracy = pipeline.robust_stage(world, checkpoint, robust, profile.eval)
    prefix = f"{which}_" if which else ""
    return {f"{prefix}robust@{eps}": value for eps, value in accuracy.items()}


def _never_poisoned_rows(profile: Profile, out: Path, world, label: str, poisoned_cache: dict,
                         robust: Optional[dict] = None) -> List[Dict]:
    """The floor a cleaned model can reach: CA and ASR of the clean foundation (with ``poisoning:
    scratch``, of the same tiny CLIP pre-trained without poison).

    Its "ASR" is how often triggered non-target images land on the target anyway, so a cleaned
    model's ASR is read against it rather than against zero.
    """
    checkpoint, _ = pipeline.foundation_stage(profile, out, world)
    robust_columns = _robust_columns("", world, checkpoint, robust, profile) if robust else {}
    rows = []
    for attack, (_, params, poisoned, _) in poisoned_cache.items():
        metrics = pipeline.evaluate_stage(world, checkpoint, attack, label, params, profile.eval)
        rows.append({"attack": attack, "defense": "never-poisoned", "setting": "default", "seed": 0,
                     "poisoned_ca": poisoned["clean_top1"], "poisoned_asr": poisoned["asr_top1"],
                     "poisoned_asr_top5": poisoned["asr_top5"], "ca": metrics["clean_top1"],
                     "asr": metrics["asr_top1"], "asr_top5": metrics["asr_top5"], "train_seconds": "",
                     "status": "ok", "error": "", **robust_columns,
                     **{k: v for k, v in poisoned.items() if k.startswith("poisoned_robust@")}})
    return rows


def _write_results(path: Path, rows: List[Dict], fields: List[str] = FIELDS) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def _mean_std(values: List[float]) -> str:
    if not values:
        return "failed"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def _asr(rows: List[Dict], prefix: str = "") -> str:
    """``top-1 mean ± std (top-5 mean)``: top-5 shows the residue a top-1 ASR hides."""
    top1 = _mean_std([r[f"{prefix}asr"] for r in rows])
    top5 = [r[f"{prefix}asr_top5"] for r in rows if r.get(f"{prefix}asr_top5") not in (None, "")]
    return top1 if not top5 or top1 == "failed" else f"{top1} ({100 * statistics.mean(top5):.1f})"


def write_markdown(path: Path, rows: List[Dict], attacks: List[str], defenses: List[str], label: str,
                    robust: Optional[dict] = None) -> None:

    default = [r for r in rows if r["setting"] == "default"]
    seeds = sorted({r["seed"] for r in default if r["defense"] != "never-poisoned"})  # its row: seed 0, whatever
    head = "| attack | poisoned CA | poisoned ASR | " + " | ".join(f"{d} CA | {d} ASR" for d in defenses) + " |"
    lines = [f"Zero-shot CA / ASR top-1 (top-5 in brackets) in %, target '{label}', on the synthetic world; "
             f"mean ± std over {len(seeds)} cleaning seed(s).", "", head, "|" + "---|" * (3 + 2 * len(defenses))]
    for attack in attacks:
        cells = [r for r in default if r["attack"] == attack]
        ok = [r for r in cells if r["status"] == "ok"]
        line = [f"{get_trigger(attack).paper_name} (`{attack}`)", _mean_std([r["poisoned_ca"] for r in ok][:1]),
                _asr(ok[:1], "poisoned_")]
        for defense in defenses:
            mine = [r for r in ok if r["defense"] == defense]
            line += [_mean_std([r["ca"] for r in mine]), _asr(mine)]
        lines.append("| " + " | ".join(line) + " |")
    if robust:
        lines += [""] + _robust_table(default, attacks, defenses, robust)
    lines += _sweep_table(rows, attacks)
    for defense in dict.fromkeys(_registered(d) for d in defenses):  # what each defense reports about itself
        if defense is None:
            continue
        extra = DEFENSES.get(defense).tables([r for r in default if _registered(r["defense"]) == defense], attacks, label)
        if extra:
            lines += [""] + extra
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed cells:"] + [f"- {r['attack']} / {r['defense']} ({r['setting']}, seed {r['seed']}): "
                                          f"{r['error']}" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def _sweep_table(rows: List[Dict], attacks: List[str]) -> List[str]:
    """A sweep's cells beside its defense's default, one ``CA / ASR (top-5)`` cell per setting: the
    trade-off curve's numbers (empty when nothing was swept)."""
    ok = [r for r in rows if r["status"] == "ok" and r["defense"] != "never-poisoned"]
    swept = list(dict.fromkeys((r["attack"], r["defense"]) for r in ok if r["setting"] != "default"))
    if not swept:
        return []
    settings = list(dict.fromkeys(r["setting"] for r in ok if r["setting"] != "default")) + ["default"]
    cell = lambda mine: (f"{_mean_std([r['ca'] for r in mine])} / {_asr(mine)}" if mine else "–")  # noqa: E731
    lines = ["", "The sweep: CA / ASR top-1 (top-5 in brackets) in % per setting, mean ± std over the seeds run.", "",
             "| attack | defense | poisoned | " + " | ".join(settings) + " |", "|" + "---|" * (3 + len(settings))]
    for attack in attacks:
        for defense in [d for a, d in swept if a == attack]:
            mine = [r for r in ok if r["attack"] == attack and r["defense"] == defense]
            poisoned = f"{_mean_std([mine[0]['poisoned_ca']])} / {_asr(mine[:1], 'poisoned_')}"
            lines.append("| " + " | ".join([f"`{attack}`", defense, poisoned] +
                                           [cell([r for r in mine if r["setting"] == s]) for s in settings]) + " |")
    return lines


def _robust_table(rows: List[Dict], attacks: List[str], defenses: List[str], robust: dict) -> List[str]:
    """Robust accuracy per attack and model, one ``eps1 / eps2 ...`` cell each (first cleaning seed)."""
    labels = [eps_label(e) for e in robust["robust_eps"]]
    attacks_used = ", ".join(robust.get("robust_attacks", ["apgd-ce", "apgd-t"]))
    cell = lambda row, which: " / ".join(  # noqa: E731
        "–" if row.get(f"{which}robust@{e}") in (None, "") else f"{100 * float(row[f'{which}robust@{e}']):.1f}"
        for e in labels)
    lines = [f"Robust zero-shot accuracy in % at eps {' / '.join(labels)} (L-inf; {attacks_used}; "
             f"{robust.get('robust_steps', 100)} steps; the first {robust.get('robust_max_images', 1000)} test images at "
             "most; "
             "first cleaning seed).", "",
             "| attack | poisoned | " + " | ".join(defenses) + " |", "|" + "---|" * (2 + len(defenses))]
    for attack in attacks:
        mine = [r for r in rows if r["attack"] == attack and r["status"] == "ok"]
        if not mine:
            continue
        line = [f"`{attack}`", cell(mine[0], "poisoned_")]
        for defense in defenses:
            found = [r for r in mine if r["defense"] == defense]
            line.append(cell(found[0], "") if found else "–")
        lines.append("| " + " | ".join(line) + " |")
    return lines


def _registered(column: str) -> Optional[str]:
    """The registered defense behind a results column (``par-synthetic`` is ``par``); None for the floor."""
    name = column[: -len("-synthetic")] if column.endswith("-synthetic") else column
    return DEFENSES.canonical(name) if name in DEFENSES else None


def _plot_tradeoff(path: Path, rows: List[Dict]) -> None:
    """ASR against CA: each defense's sweep as a line per attack (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ok = [r for r in rows if r["status"] == "ok"]
    swept = {r["attack"] for r in ok if r["setting"] != "default"}
    ok = [r for r in ok if r["attack"] in swept] or ok  # the curves; every attack when nothing was swept
    floors = [r for r in ok if r["defense"] == "never-poisoned"]
    ok = [r for r in ok if r["defense"] != "never-poisoned"]
    markers = dict(zip(sorted({r["defense"] for r in ok}), "o^sDvP<>*hX"))
    for defense in sorted({r["defense"] for r in ok}):
        for attack in sorted({r["attack"] for r in ok}):
            points = sorted((r["ca"], r["asr"], r["setting"]) for r in ok
                            if r["defense"] == defense and r["attack"] == attack)
            if points:
                ax.plot([100 * p[0] for p in points], [100 * p[1] for p in points], marker=markers.get(defense, "x"),
                        label=f"{defense} / {attack}", alpha=0.8)
    poisoned = {r["attack"]: (r["poisoned_ca"], r["poisoned_asr"]) for r in ok}
    for attack, (ca, asr) in poisoned.items():
        ax.scatter([100 * ca], [100 * asr], color="black", marker="*", zorder=5)
    if floors:
        ax.scatter([100 * r["ca"] for r in floors], [100 * r["asr"] for r in floors], color="gray",
                   marker="P", zorder=5, label="never poisoned")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title("defense trade-off (black stars: poisoned models)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
