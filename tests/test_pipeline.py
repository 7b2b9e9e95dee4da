"""End to end through the real shell entry points, on the micro profile."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _run(args, env_extra=None, check=True):
    env = dict(os.environ, PAR_PYTHON=sys.executable, **(env_extra or {}))
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    first = _run(["bash", "trigger.sh"], {"DEMO_PROFILE": "configs/micro.yaml", "OUT_DIR": str(out)})
    return out, first


def test_demo_runs_end_to_end(demo):
    out, first = demo
    assert "CA top-1" in first.stdout and "poisoned" in first.stdout and "PAR" in first.stdout
    (report,) = out.glob("cleaned-badnet_rs-*/report.json")
    data = json.loads(report.read_text())
    assert list(data["results"]) == ["poisoned", "PAR"] and data["defense"] == "par"
    # the table reports each model's own evaluation (records kept beside its checkpoint)
    for name, checkpoint in (("poisoned", data["poisoned_checkpoint"]), ("PAR", data["cleaned_checkpoint"])):
        (results,) = Path(checkpoint).parent.glob("results-badnet_rs-*.jsonl")
        stored = {k: v for line in results.read_text().splitlines() for k, v in json.loads(line)["metrics"].items()}
        assert data["results"][name] == stored
        assert f"{name:<12}{100 * stored['clean_top1']:>9.1f}%{100 * stored['asr_top1']:>10.1f}%" in first.stdout
    assert (out / "world" / "world.json").exists()
    (foundation,) = out.glob("foundation-*/checkpoint.pt")  # micro.yaml names no shared cache: under OUT_DIR
    assert (foundation.parent / "metrics.jsonl").read_text().count("\n") == 4
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")  # a 3-step poisoning fine-tune of it
    assert (poisoned.parent / "metrics.jsonl").read_text().count("\n") == 3
    assert f"init_checkpoint: {foundation}" in (poisoned.parent / "config.yaml").read_text()


def test_demo_reuses_the_poisoned_model(demo, capsys):
    """What ``bash trigger.sh`` runs a second time (in process: the shell run is the fixture's)."""
    from par.app.cli import main

    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    (foundation,) = out.glob("foundation-*/checkpoint.pt")
    before = [poisoned.stat().st_mtime_ns, foundation.stat().st_mtime_ns]
    capsys.readouterr()
    assert main(["demo", "--profile", f"{REPO}/configs/micro.yaml", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
    assert [poisoned.stat().st_mtime_ns, foundation.stat().st_mtime_ns] == before
    assert len(list(out.glob("cleaned-badnet_rs-*/report.json"))) >= 1


def test_clean_a_given_checkpoint_through_trigger_sh(demo, tmp_path):
    """The shell entry point with a non-default DEFENSE: cleaned, then validated."""
    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    clean_out = tmp_path / "cleaned"
    env = {
        "CHECKPOINT": str(poisoned), "ENCODER": "par-micro-vit", "TRAIN_DATA": str(out / "world" / "clean.csv"),
        "OUT_DIR": str(clean_out), "PAR_CONFIG": "configs/micro/par.yaml", "EVAL_CSV": str(out / "world" / "test.csv"),
        "DEFENSE": "roclip", "ATTACK": "badnet_rs", "LABEL": "banana",
    }
    proc = _run(["bash", "trigger.sh", "--steps", "2"], env)
    assert (clean_out / "checkpoint.pt").exists() and (clean_out / "training.png").exists()
    assert "objective: roclip" in (clean_out / "config.yaml").read_text()
    assert "steps: 2" in (clean_out / "config.yaml").read_text()
    # then trigger_validate.sh on what it cleaned: class names and templates found beside EVAL_CSV
    records = [json.loads(line) for line in (clean_out / "results.jsonl").read_text().splitlines()]
    assert [r["evaluation"] for r in records] == ["classification/clean", "classification/badnet_rs"]
    assert all(r["encoder"] == "par-micro-vit" and r["checkpoint"] == str(clean_out / "checkpoint.pt") for r in records)
    assert all(r["attack"] == "badnet_rs" and r["label"] == "banana" for r in records)
    assert set(records[0]["metrics"]) == {"clean_top1", "clean_top5"}
    assert set(records[1]["metrics"]) == {"asr_top1", "asr_top5"}
    assert "ASR top-1" in proc.stdout and "retrieval: skipped" in proc.stdout
    assert f"classes {out / 'world' / 'classnames.txt'}, templates {out / 'world' / 'templates.txt'}" in proc.stdout


def test_trigger_sh_reads_relative_paths_from_the_callers_directory_and_validates_a_multi_stage_defense(demo,
                                                                                                       tmp_path):
    """From another directory, with paths relative to it: ``invert`` keeps its checkpoint in its last stage's
    folder, and that is the checkpoint validated; the results land in OUT_DIR."""
    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    rel = lambda path: os.path.relpath(path, tmp_path)  # noqa: E731
    env = dict(os.environ, PAR_PYTHON=sys.executable, CHECKPOINT=rel(poisoned), ENCODER="par-micro-vit",
               TRAIN_DATA=rel(out / "world" / "clean.csv"), OUT_DIR="cleaned", EVAL_CSV=rel(out / "world" / "test.csv"),
               PAR_CONFIG=rel(Path(REPO, "configs", "micro", "par.yaml")), DEFENSE="invert", ATTACK="badnet_rs",
               LABEL="banana")
    proc = subprocess.run(["bash", str(Path(REPO, "trigger.sh")), "--steps", "2", "--classnames",
                           rel(out / "world" / "classnames.txt"), "--templates", rel(out / "world" / "templates.txt"),
                           "--invert.scanner", "decree-text"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    cleaned = tmp_path / "cleaned"
    records = [json.loads(line) for line in (cleaned / "results.jsonl").read_text().splitlines()]
    assert [r["evaluation"] for r in records] == ["classification/clean", "classification/badnet_rs"]
    assert {r["checkpoint"] for r in records} == {"cleaned/finetune/checkpoint.pt"}
    assert (cleaned / "finetune" / "checkpoint.pt").exists() and not (Path(REPO) / "cleaned").exists()


def test_clean_takes_a_recipe_written_for_its_encoder_and_refuses_one_for_another(demo, tmp_path, capsys):
    """configs/recipes/ name their encoder (for `par train`); `par clean --config` (trigger.sh's PAR_CONFIG) takes
    them for that encoder."""
    from par.app.cli import main

    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    recipe = tmp_path / "par-micro.yaml"
    recipe.write_text(Path(REPO, "configs", "micro", "par.yaml").read_text() + "\nmodel: par-micro-vit\n")
    common = ["clean", "--defense", "par", "--model", "par-micro-vit", "--checkpoint", str(poisoned),
              "--train-data", str(out / "world" / "clean.csv"), "--steps", "2"]
    assert main(common + ["--config", str(recipe), "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "checkpoint.pt").exists()
    assert main(common + ["--config", str(Path(REPO, "configs", "recipes", "par-RN50.yaml")), "--out",
                          str(tmp_path / "no")]) == 2
    assert "is a recipe for RN50, not for par-micro-vit" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("defense, objective", [("par", "par"), ("ft", "clip"), ("cleanclip", "cleanclip")])
def test_clean_a_given_checkpoint_with_each_defense(demo, tmp_path, defense, objective):
    """What trigger.sh runs for each defense, in process."""
    from par.app.cli import main

    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    clean_out = tmp_path / "cleaned"
    assert main(["clean", "--defense", defense, "--config", f"{REPO}/configs/micro/par.yaml", "--model",
                 "par-micro-vit", "--checkpoint", str(poisoned), "--train-data", str(out / "world" / "clean.csv"),
                 "--out", str(clean_out), "--steps", "2"]) == 0
    assert (clean_out / "checkpoint.pt").exists() and (clean_out / "training.png").exists()
    config = (clean_out / "config.yaml").read_text()
    assert f"objective: {objective}" in config and "steps: 2" in config


def test_validate_without_data_is_a_clear_error(tmp_path):
    proc = _run(["bash", "trigger_validate.sh", "x.pt", "badnet_rs", "RN50", "banana"],
                {"EVAL_CSV": str(tmp_path / "none.csv")}, check=False)
    assert proc.returncode != 0 and f"classification data not found: {tmp_path / 'none.csv'}" in proc.stderr
    proc = _run(["bash", "trigger_validate.sh", "x.pt"], check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_the_demo_refuses_a_defense_it_cannot_run_before_drawing_its_world(tmp_path, capsys):
    from par.app.cli import main

    assert main(["demo", "--profile", f"{REPO}/configs/micro.yaml", "--out", str(tmp_path / "d"),
                 "--defense", "tecoa"]) == 2
    assert "defense 'tecoa' trains on class labels" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_the_demo_world_in_a_shared_cache_is_found_where_trigger_validate_looks(tmp_path):
    """``trigger_validate.sh`` without evaluation data reads ``runs/demo/world``; the demo's world lies in the cache."""
    from par.app.cli import main

    (tmp_path / "micro-cached.yaml").write_text(f"extends: {REPO}/configs/micro.yaml\ncache: {tmp_path / 'cache'}\n")
    assert main(["demo", "--profile", str(tmp_path / "micro-cached.yaml"), "--out", str(tmp_path / "demo")]) == 0
    (world,) = (tmp_path / "cache").glob("world-*")
    link = tmp_path / "demo" / "world"
    assert link.is_symlink() and link.resolve() == world.resolve() and (link / "test.csv").is_file()


def test_two_builds_of_one_folder_take_turns(tmp_path):
    """Two invocations sharing a cache that need one unbuilt folder: the second waits, then finds it built."""
    import threading
    import time

    from par.app.pipeline import built_once

    inside, overlapped, built = [], [], []

    def build():
        inside.append(1)
        overlapped.append(len(inside) > 1)
        time.sleep(0.3)
        built.append(len(built))
        inside.pop()
        return built[-1]

    threads = [threading.Thread(target=built_once, args=(tmp_path / "foundation-x", build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlapped == [False, False] and built == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]  # the lock lies apart from the folders


def test_a_stage_stopped_after_a_save_goes_on_from_it_when_run_again(tmp_path, monkeypatch):
    """A rebuilt stage continues from the state its interrupted run saved (save_every), rather than refusing
    the folder, whose name is a digest the user cannot change."""
    import json as json_module
    from dataclasses import replace

    from conftest import micro_profile, stop_before_checkpoint
    from par import train as loop
    from par.app import pipeline

    profile = micro_profile("micro.yaml", tmp_path / "cache")
    profile = replace(profile, foundation={**profile.foundation, "save_every": 2})
    world = pipeline.make_world_stage(profile, tmp_path / "out")
    with monkeypatch.context() as m:
        m.setattr(loop, "finish", stop_before_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            pipeline.foundation_stage(profile, tmp_path / "out", world)
    (folder,) = (tmp_path / "cache").glob("foundation-*")
    assert (folder / "state-latest.pt").is_file() and not (folder / "checkpoint.pt").exists()
    checkpoint, _ = pipeline.foundation_stage(profile, tmp_path / "out", world)
    assert checkpoint == folder / "checkpoint.pt" and checkpoint.is_file()
    steps = [json_module.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the first run's two steps kept, the last two trained from its state


def test_a_cache_moved_elsewhere_is_reused_not_rebuilt(tmp_path):
    """Keys hold paths inside the shared folder relative to it (the foundation a model starts from): a checkout
    moved or cloned elsewhere with its cache reuses its poisoned models and their evaluations."""
    import shutil

    from conftest import micro_profile
    from par.app import pipeline

    def built(cache):
        profile = micro_profile("micro.yaml", cache)
        world = pipeline.make_world_stage(profile, tmp_path / "out")
        return pipeline.build_poisoned(profile, tmp_path / "out", world, "badnet_rs")

    model, _, metrics, _ = built(tmp_path / "a" / "cache")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    before = sorted(p.relative_to(tmp_path / "elsewhere") for p in (tmp_path / "elsewhere").rglob("*"))
    moved, _, moved_metrics, _ = built(tmp_path / "elsewhere" / "b" / "cache")
    assert moved.key == model.key and moved_metrics == metrics
    after = sorted(p.relative_to(tmp_path / "elsewhere") for p in (tmp_path / "elsewhere").rglob("*"))
    assert [p for p in after if p not in before and ".locks" not in p.parts] == []  # nothing built again


def test_a_changed_logging_setting_finds_the_stage_built_before(tmp_path):
    """log_every, eval_every and the other reporting settings change no weight: not in a folder's key."""
    from dataclasses import replace

    from conftest import micro_profile
    from par.app import pipeline

    profile = micro_profile("micro.yaml", tmp_path / "cache")
    world = pipeline.make_world_stage(profile, tmp_path / "out")
    first, key = pipeline.foundation_stage(profile, tmp_path / "out", world)
    logged = replace(profile, foundation={**profile.foundation, "log_every": 2, "eval_every": 2, "progress": True})
    again, same_key = pipeline.foundation_stage(logged, tmp_path / "out", world)
    assert (again, same_key) == (first, key)
    other = replace(profile, foundation={**profile.foundation, "lr": 2e-3})
    assert pipeline.foundation_stage(other, tmp_path / "out", world)[1] != key  # a setting that trains otherwise


def test_a_recipe_names_its_defense_unless_one_is_given(demo, tmp_path, capsys):
    """`par clean --config RECIPE` (trigger.sh's PAR_CONFIG without DEFENSE) cleans with the defense the recipe's
    objective names: a CleanCLIP recipe with CleanCLIP, not with PAR on CleanCLIP's budget."""
    from par.app.cli import main

    out, _ = demo
    (poisoned,) = out.glob("poisoned-badnet_rs-*/checkpoint.pt")
    recipe = tmp_path / "cleanclip-micro.yaml"
    recipe.write_text("objective: cleanclip\nobjective_params: {unimodal_weight: 1.0}\naugment: none\nbatch_size: 32\n"
                      "lr: 1.0e-4\nwarmup: 1\nthreads: 1\nprogress: false\n")
    common = ["clean", "--model", "par-micro-vit", "--checkpoint", str(poisoned), "--config", str(recipe),
              "--train-data", str(out / "world" / "clean.csv"), "--steps", "2"]
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert "cleaned checkpoint (cleanclip):" in capsys.readouterr().out
    assert "objective: cleanclip" in (tmp_path / "a" / "config.yaml").read_text()
    assert main(common + ["--defense", "par", "--out", str(tmp_path / "b")]) == 0  # named: the recipe lends its budget
    assert "objective: par" in (tmp_path / "b" / "config.yaml").read_text()
    recipe.write_text("objective: clip-unlearn\nsteps: 1\n")
    assert main(common + ["--out", str(tmp_path / "c")]) == 2
    assert "trains objective 'clip-unlearn', which is no defense: name one with --defense" in capsys.readouterr().err
