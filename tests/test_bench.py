import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import REPO, micro_profile
from par.app.bench import _cells, run_bench, write_markdown
from par.app.profile import Profile, Robust
from par.errors import ParError

MICRO_BENCH = f"{REPO}/configs/micro-bench.yaml"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run_bench(MICRO_BENCH, str(out), quick=True, progress=False)
    (out / "results-first.csv").write_text((out / "results.csv").read_text())  # tests below run the bench again
    return out


def test_quick_bench_writes_csv_markdown_and_plots(bench):
    rows = list(csv.DictReader((bench / "results.csv").open()))
    assert [(r["attack"], r["defense"], r["setting"]) for r in rows] == [
        ("badnet_rs", "par", "default"), ("badnet_rs", "ft", "default"), ("badnet_rs", "par-synthetic", "default"),
        ("badnet_rs", "never-poisoned", "default")]
    (poisoned_run,) = bench.glob("poisoned-badnet_rs-*")
    poisoned = _stored_metrics(poisoned_run)
    for r in rows:
        assert r["status"] == "ok"
        # each cell reports its own cleaned model's stored evaluation, next to the poisoned model's
        assert (float(r["poisoned_ca"]), float(r["poisoned_asr"])) == pytest.approx(
            (poisoned["clean_top1"], poisoned["asr_top1"]))
        if r["defense"] != "never-poisoned":
            (run,) = bench.glob(f"cleaned-badnet_rs-{r['defense']}-" + "?" * 16)  # digest: not -synthetic-
            cleaned = _stored_metrics(run)
            assert (float(r["ca"]), float(r["asr"])) == pytest.approx(
                (cleaned["clean_top1"], cleaned["asr_top1"]))
    md = (bench / "results.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0] == ("| attack | poisoned CA | poisoned ASR | never-poisoned CA | never-poisoned ASR | par CA "
                        "| par ASR | ft CA | ft ASR | par-synthetic CA | par-synthetic ASR |")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[2].startswith("| BadNet-Stripes (`badnet_rs`) |")
    # the never-poisoned reference is the clean model's own evaluation, not the poisoned one's
    (clean_run,) = bench.glob("foundation-*")
    floor = [r for r in rows if r["defense"] == "never-poisoned"][0]
    records = [json.loads(line) for line in next(clean_run.glob("results-badnet_rs-*.jsonl")).read_text().splitlines()]
    assert float(floor["asr"]) == pytest.approx(records[-1]["metrics"]["asr_top1"])
    assert float(floor["poisoned_asr"]) == pytest.approx(float(rows[0]["poisoned_asr"]))
    for png in ("tradeoff.png", "triggers.png"):
        assert Image.open(bench / png).format == "PNG"
    attacks = {r["attack"] for r in rows}
    assert Image.open(bench / "triggers.png").size[0] == 128 * (1 + len(attacks))  # the clean tile, the profile's attacks


def _stored_metrics(run: Path) -> dict:
    (results,) = run.glob("results-badnet_rs-*.jsonl")
    return {k: v for line in results.read_text().splitlines() for k, v in json.loads(line)["metrics"].items()}


def test_rerun_resumes_finished_cells(bench, capsys):
    cleaned = sorted(bench.glob("cleaned-*/checkpoint.pt"))
    stamps = [p.stat().st_mtime_ns for p in cleaned]
    run_bench(MICRO_BENCH, str(bench), quick=True, progress=True)  # bars or none: the same cells
    assert [p.stat().st_mtime_ns for p in cleaned] == stamps
    assert capsys.readouterr().out.count("reusing") >= 4  # poisoned model + three cleaned cells
    (synthetic_run,) = bench.glob("cleaned-badnet_rs-par-synthetic-*")
    assert "world-synthetic-" in (synthetic_run / "config.yaml").read_text()


def test_changing_the_synthetic_world_recleans_only_its_cells(bench):
    profile = Profile.load(MICRO_BENCH)
    synthetic = profile.synthetic_cleaning
    profile = replace(profile, synthetic_cleaning=replace(synthetic, world={**synthetic.world, "style": "cartoon"}))
    (before,) = bench.glob("cleaned-badnet_rs-par-synthetic-*")
    others = {p: p.stat().st_mtime_ns for p in bench.glob("cleaned-*/checkpoint.pt") if p.parent != before}
    run_bench(profile, str(bench), quick=True, progress=False)
    synthetic_runs = sorted(bench.glob("cleaned-badnet_rs-par-synthetic-*"))
    assert len(synthetic_runs) == 2 and len(list(bench.glob("world-synthetic-*"))) == 2
    (after,) = [p for p in synthetic_runs if p != before]
    assert "cartoon" in json.loads(Path(yaml.safe_load((after / "config.yaml").read_text())["train_data"])
                                   .parent.joinpath("world.json").read_text())["config"]["style"]
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_failed_cell_is_recorded_and_others_continue(tmp_path, micro_cache, monkeypatch):
    from par.app import pipeline

    profile = micro_profile("micro-bench.yaml", micro_cache)
    profile = replace(profile, quick={**profile.quick, "sweeps": {"par": {"warmup": [2]}}})
    clean_stage = pipeline.clean_stage

    def failing(world, defense, model, values, run_dir, **kwargs):  # a cell that fails as it runs (diverges, say)
        if values.get("warmup") == 2:
            raise ParError("loss became nan at step 2 (a test's failure)")
        return clean_stage(world, defense, model, values, run_dir, **kwargs)

    monkeypatch.setattr(pipeline, "clean_stage", failing)
    with pytest.raises(ParError, match=r"1 of \d+ cells failed: their errors are in .*results.csv"):
        run_bench(profile, str(tmp_path / "out"), quick=True, progress=False)  # after every table is written
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    status = {(r["defense"], r["setting"]): (r["status"], r["error"]) for r in rows}
    assert status[("par", "warmup=2")] == ("failed", "ParError: loss became nan at step 2 (a test's failure)")
    assert status[("par", "default")][0] == "ok" and status[("ft", "default")][0] == "ok"
    assert "Failed cells:" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"sweeps": {"par": {"warmup": [99]}}}, "warmup (99)"),  # warmup > steps
    ({"label": "bananna"}, "profile label 'bananna' is not a class of the world"),
    ({"attack_params": {"blended": {"alpah": 0.2}}}, "alpah"),
    ({"defenses": ["par", "tecoa"]}, "defense 'tecoa' trains on class labels"),
    ({"sweeps": {"par": {"warmup": [2, 2]}}}, "sweep of par lists a value of 'warmup' twice: [2, 2]"),
    ({"sweeps": {"par": {"objective_params.tau": [2.0]}}, "defense_settings": {"par": {"objective_params": {"tau": 2.0}}}},
     "sweep of par {'objective_params.tau': 2.0} is its default setting"),
])
def test_what_every_cell_reads_is_checked_before_the_world_is_drawn(tmp_path, micro_cache, change, message):
    profile = micro_profile("micro-bench.yaml", micro_cache, attacks=["badnet_rs", "blended"], **change)
    with pytest.raises(ParError, match=__import__("re").escape(message)):
        run_bench(profile, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_an_attack_or_defense_named_twice_on_the_command_line_is_refused(tmp_path, micro_cache):
    """Two cells of one name would train into one folder side by side and count twice in the means."""
    profile = micro_profile("micro-bench.yaml", micro_cache)
    with pytest.raises(ParError, match=r"bench attacks name \['badnet_rs'\] more than once"):
        run_bench(profile, str(tmp_path / "out"), attacks=["badnet_rs", "badnet-stripes"], progress=False)
    with pytest.raises(ParError, match=r"bench defenses name \['par'\] more than once"):
        run_bench(profile, str(tmp_path / "out"), defenses=["par", "par"], progress=False)
    assert not (tmp_path / "out").exists()


def test_quick_without_a_quick_part_is_refused(tmp_path, micro_cache):
    profile = micro_profile("micro-bench.yaml", micro_cache, quick={})
    with pytest.raises(ParError, match="no 'quick' part"):
        run_bench(profile, str(tmp_path / "out"), quick=True, progress=False)


def test_models_side_by_side_are_the_one_thread_models_in_order(tmp_path, micro_cache):
    """jobs 2: the poisoned models and the cells are trained in two processes of one thread each, and the
    rows are those of the same one-thread models trained one after another (one thread's arithmetic does
    not depend on the process)."""
    profile = micro_profile("micro-bench.yaml", micro_cache, defenses=["ft", "par"], seeds=[0, 1],
                            synthetic_cleaning=None, reference=False, quick={"attacks": ["badnet_rs", "blended"], "sweeps": {}})
    one_thread = profile.one_thread()
    assert one_thread.poison_finetune["threads"] == one_thread.clean["threads"] == 1
    assert one_thread.foundation == profile.foundation  # trained alone, before the rest
    one_thread_models = lambda: sorted(p for p in Path(micro_cache).glob("poisoned-*")  # noqa: E731
                                       if yaml.safe_load((p / "config.yaml").read_text())["threads"] == 1)
    run_bench(one_thread, str(tmp_path / "serial"), quick=True, progress=False)
    poisoned = one_thread_models()
    assert len(poisoned) >= 2
    run_bench(profile, str(tmp_path / "side-by-side"), quick=True, progress=False, jobs=2)
    assert one_thread_models() == poisoned  # the same models, reused
    read = lambda out: [(r["defense"], r["seed"], r["status"], r["ca"], r["asr"], r["asr_top5"])  # noqa: E731
                        for r in csv.DictReader((tmp_path / out / "results.csv").open())]
    serial, side_by_side = read("serial"), read("side-by-side")
    assert [r[:3] for r in serial] == [(d, seed, "ok") for d in ("ft", "par") for seed in "01"] * 2
    assert side_by_side == serial
    for config in (tmp_path / "side-by-side").glob("cleaned-*/config.yaml"):
        assert yaml.safe_load(config.read_text())["threads"] == 1
    with pytest.raises(ParError, match="jobs must be a whole number >= 1"):
        run_bench(profile, str(tmp_path / "none"), jobs=0)
    with pytest.raises(ParError, match="profile key 'jobs'"):
        micro_profile("micro-bench.yaml", micro_cache, jobs=0)


def test_unknown_attack_or_defense_lists_known(tmp_path):
    with pytest.raises(ParError, match="unknown attack 'nope'.*badnet_rs"):
        run_bench(MICRO_BENCH, str(tmp_path), attacks=["nope"])
    with pytest.raises(ParError, match="unknown defense 'nope'.*roclip"):
        run_bench(MICRO_BENCH, str(tmp_path), defenses=["nope"])


def test_sweeps_run_only_on_sweep_attacks():
    profile = Profile(sweep_attacks=["blended"])
    cells = [(a, d, s, data) for a, d, s, _, _, data in
             _cells(profile, ["badnet_rs", "blended"], ["par", "ft"], [0],
                    {"par": {"objective_params.tau": [0.5, 1.0]}}, ["par"])]
    assert cells == [
        ("badnet_rs", "par", "default", "world"), ("badnet_rs", "ft", "default", "world"),
        ("badnet_rs", "par", "default", "synthetic"),
        ("blended", "par", "default", "world"), ("blended", "par", "tau=0.5", "world"),
        ("blended", "par", "tau=1.0", "world"), ("blended", "ft", "default", "world"),
        ("blended", "par", "default", "synthetic")]
    every = [c[:3] for c in _cells(Profile(), ["badnet_rs", "blended"], ["par"], [0], {"par": {"objective_params.tau": [0.5]}}, [])]
    assert every == [("badnet_rs", "par", "default"), ("badnet_rs", "par", "tau=0.5"),
                     ("blended", "par", "default"), ("blended", "par", "tau=0.5")]


def test_markdown_reports_a_sweep_beside_its_default(tmp_path):
    def row(setting, seed, ca, asr):
        return {"attack": "badnet_rs", "defense": "par", "setting": setting, "seed": seed, "status": "ok",
                "poisoned_ca": 0.9, "poisoned_asr": 0.95, "poisoned_asr_top5": 1.0, "ca": ca, "asr": asr,
                "asr_top5": 0.5}
    rows = [row("default", 0, 0.85, 0.02), row("tau=0.5", 0, 0.89, 0.12), row("default", 1, 0.87, 0.04),
            row("tau=0.5", 1, 0.91, 0.10)]
    write_markdown(tmp_path / "tau.md", rows, ["badnet_rs"], ["par"], "banana")
    text = (tmp_path / "tau.md").read_text()
    assert "| attack | defense | poisoned | tau=0.5 | default |" in text
    assert "| `badnet_rs` | par | 90.0 / 95.0 (100.0) | 90.0 ± 1.4 / 11.0 ± 1.4 (50.0) | 86.0 ± 1.4 / 3.0 ± 1.4 (50.0) |" in text
    write_markdown(tmp_path / "plain.md", [r for r in rows if r["setting"] == "default"], ["badnet_rs"], ["par"], "banana")
    assert "The sweep" not in (tmp_path / "plain.md").read_text()


def test_cached_evaluations_are_keyed_by_trigger_settings(micro_world, tmp_path):
    from par import models
    from par.app import pipeline

    checkpoint = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "model.pt")
    world = pipeline.World(path=micro_world, key="w", model="par-micro-vit")
    settings = {"seed": 0, "batch_size": 64}
    pipeline.evaluate_stage(world, checkpoint, "badnet_rs", "banana", {"patch_size": 4}, settings)
    pipeline.evaluate_stage(world, checkpoint, "badnet_rs", "banana", {"patch_size": 8}, settings)
    files = sorted(tmp_path.glob("results-badnet_rs-*.jsonl"))
    assert len(files) == 2  # another patch size is another evaluation, not a stale cache hit
    sizes = {json.loads(f.read_text().splitlines()[-1])["attack_params"]["patch_size"] for f in files}
    assert sizes == {4, 8}
    stamps = [f.stat().st_mtime_ns for f in files]
    pipeline.evaluate_stage(world, checkpoint, "badnet_rs", "banana", {"patch_size": 8}, settings)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(list(tmp_path.glob("results-*"))) == 2


def test_fare_column_and_robust_accuracy_table(bench):
    """FARE as a defense cell, and robust accuracy of the poisoned, never-poisoned and cleaned models."""
    profile = Profile.load(MICRO_BENCH)
    profile = replace(profile, quick={**profile.quick, "defenses": ["fare", "ft"], "synthetic_cleaning": None},
                      defense_settings={**profile.defense_settings,
                                        "fare": {"augment": "none", "objective_params": {"steps": 2}}},
                      robust=Robust(eps=["4/255", "64/255"], steps=3, max_images=8))
    run_bench(profile, str(bench), quick=True, progress=False)  # the poisoned model and ft cell are reused
    rows = list(csv.DictReader((bench / "results.csv").open()))
    assert [(r["defense"], r["status"]) for r in rows] == [("fare", "ok"), ("ft", "ok"), ("never-poisoned", "ok")]
    for row in rows:
        small, large = (float(row[f"robust@{e}"]) for e in ("4/255", "64/255"))
        assert 0 <= large <= small <= 1
        assert float(row["poisoned_robust@4/255"]) == float(rows[0]["poisoned_robust@4/255"])
    records = [json.loads(line) for p in bench.glob("cleaned-badnet_rs-fare-*/robust-*.jsonl")
               for line in p.read_text().splitlines() if '"robust"' in line]
    assert [r["num_images"] for r in records] == [8, 8] and records[0]["robust"]["steps"] == 3
    table = (bench / "results.md").read_text().split("Robust zero-shot accuracy")[1].splitlines()
    assert table[2] == "| attack | poisoned | never-poisoned | fare | ft |"
    assert table[4].startswith("| `badnet_rs` | ") and table[4].count(" / ") == 4


def test_results_render_into_the_readme_between_markers(bench, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_readme", f"{REPO}/scripts/bench_readme.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    results = bench / "results-first.csv"  # the fixture's own run: other tests of this module rewrite results.csv
    rows = list(csv.DictReader(results.open()))
    ours = {d: next(f"{100 * float(r['asr']):.1f}" for r in rows if r["defense"] == d) for d in ("par", "ft")}
    assert script.main([str(results), "--config", MICRO_BENCH, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n<!-- results:start -->\nZero-shot CA / ASR") and text.endswith("<!-- results:end -->\ntail\n")
    # the bench's own ASRs (par, cleanclip and roclip not run: dashes, then ft) beside the paper's figures
    assert f"| BadNet-Stripes | {ours['par']} | — | — | {ours['ft']} | 42.4 | 62.3 | 82.0 |" in text
    assert "old" not in text
    readme.write_text("no markers\n")
    capsys.readouterr()
    assert script.main([str(bench / "results.csv"), "--readme", str(readme)]) == 2
    assert "lacks the markers" in capsys.readouterr().err and readme.read_text() == "no markers\n"


def test_a_profile_may_poison_a_count_of_pairs_instead_of_a_share(tmp_path):
    from par.attacks.poison import PoisonConfig
    from par.config import build

    profile = micro_profile("micro-bench.yaml", tmp_path, poison={"num": 12, "seed": 3})
    values = profile.poison_values("badnet_rs")
    assert values["num"] == 12 and values["rate"] is None and values["seed"] == 3
    config = build(PoisonConfig, {"csv": "x.csv", "attack": "badnet_rs", "label": "banana", "out": str(tmp_path / "p"),
                                  **values}, "profile 'poison'")
    assert config.num == 12


def test_the_worlds_key_does_not_depend_on_its_worker_count(tmp_path):
    from par.app.pipeline import make_world_stage

    one = make_world_stage(micro_profile("micro-bench.yaml", tmp_path / "a", world={"seed": 5, "train": 40, "clean": 8,
                                                                                     "test": 8, "workers": 1}), tmp_path)
    two = make_world_stage(micro_profile("micro-bench.yaml", tmp_path / "b", world={"seed": 5, "train": 40, "clean": 8,
                                                                                     "test": 8, "workers": 2}), tmp_path)
    assert one.key == two.key  # the foundation and everything after it stay cached


def test_a_failed_scan_leaves_its_attacks_cells_running_and_says_so_under_the_scan_table(tmp_path, micro_cache,
                                                                                         monkeypatch):
    from par.app import scanbench

    profile = micro_profile("micro-bench.yaml", micro_cache, defenses=["ft"], seeds=[0], reference=False,
                            synthetic_cleaning=None, quick={"attacks": ["badnet_rs"], "sweeps": {}},
                            scan={"scanners": ["decree"], "zero_poison_seeds": [], "benign_seeds": []})
    scan_model = scanbench.scan_model

    def failing(world, model, scanner, part):  # the poisoned model's scan breaks; the foundation's does not
        if model.kind == "poisoned":
            raise ParError("a test's broken scan")
        return scan_model(world, model, scanner, part)

    monkeypatch.setattr(scanbench, "scan_model", failing)
    with pytest.raises(ParError, match=r"the scans of \['badnet_rs'\] failed: left out of the scan table"):
        run_bench(profile, str(tmp_path / "out"), quick=True, progress=False)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["attack"], r["defense"], r["status"]) for r in rows] == [("badnet_rs", "ft", "ok")]
    scan_md = (tmp_path / "out" / "scan.md").read_text()
    assert "- `badnet_rs`: ParError: a test's broken scan" in scan_md
    assert "| `decree` | foundation |" in scan_md and "poisoned (badnet_rs)" not in scan_md
