"""The measurement scripts run end to end on tiny inputs (their figures are benchmarks, not tests)."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from par.errors import ParError


def _script(name):
    """``scripts/<name>`` loaded as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), f"{REPO}/scripts/{name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, capsys):
    """Runs ``scripts/<args[0]>`` with the other arguments in this process; its stdout."""
    capsys.readouterr()
    assert _script(args[0].removeprefix("scripts/")).main([str(a) for a in args[1:]]) == 0
    return capsys.readouterr().out


def test_train_throughput_measures_synthetic_and_loader(micro_world, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    common = ["scripts/train_throughput.py", "--model", "par-micro-vit", "--batch", "8", "--steps", "2",
              "--warmup", "1", "--device", "cpu", "--peak-tflops", "1", "--out", str(out)]
    stdout = _run([*common, "--precision", "fp32", "amp", "--workers", "0", "--csv", str(micro_world / "train.csv"),
                   "--grad-checkpointing", "--profile", str(tmp_path / "profile.txt")], capsys)
    _run([*common, "--precision", "fp32", "--objective", "ft", "--augment", "none"], capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["precision"], r["objective"]) for r in records] == [
        ("synthetic", "fp32", "par"), ("loader", "fp32", "par"), ("synthetic", "fp32", "ft")]
    for r in records:
        assert r["samples_per_s"] > 0 and r["mfu"] is not None
    assert records[0]["grad_checkpointing"] and not records[2]["grad_checkpointing"]
    # PAR's step is fine-tuning's plus the frozen copy's forward: between 1x and 1.5x its FLOPs
    assert 1.1 < records[0]["gflop_per_sample"] / records[2]["gflop_per_sample"] < 1.5
    assert any(line.split() == ["amp", "skipped:", "fp16", "autocast", "is", "for", "CUDA"] for line in stdout.splitlines())
    assert "par step, batch 8 + grad_checkpointing" in stdout and "GFLOP per sample per step" in stdout
    assert "Optimizer.step" in (tmp_path / "profile.txt").read_text()  # the loop's own step was profiled


def test_eval_throughput_measures_clean_and_triggered(micro_world, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    _run(["scripts/eval_throughput.py", "--model", "par-micro-vit", "--data", str(micro_world / "test.csv"),
          "--classnames", str(micro_world / "classnames.txt"), "--batch", "16", "--device", "cpu",
          "--out", str(out)], capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    (record,) = records
    assert record["images"] == 48 and record["attack"] == "badnet_rs"
    assert all(record[key] > 0 for key in ("forward_only", "clean_eval", "triggered_eval"))


def test_step_flops_counts_a_known_model():
    """The FLOP count behind MFU, on a model whose count is known: 2 * m * n * k per matmul forward, and
    backward the weights' gradients alone (the inputs need none): twice the forward."""
    import torch

    script = _script("train_throughput.py")

    class TwoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(12, 5, bias=False), torch.nn.Linear(7, 3, bias=False)

        def forward(self, images, tokens):
            return self.image(images), self.text(tokens), None

    class SumObjective:
        def step_module(self, model):
            return model

        def __call__(self, model, batch):
            image, text, _ = model(batch.images, batch.tokens)
            return {"loss": image.sum() + text.sum()}

    model = TwoLinear()
    batch = type("Batch", (), {"images": torch.zeros(4, 12), "tokens": torch.zeros(4, 7)})()
    assert script.step_flops(SumObjective(), model, batch) == 2 * (2 * 4 * 12 * 5 + 2 * 4 * 7 * 3)
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients behind


def test_backdoor_rate_search_walks_down_while_the_attack_succeeds_and_up_while_it_fails(tmp_path, capsys):
    config = f"{REPO}/configs/micro-bench.yaml"
    args = ["scripts/backdoor_all_triggers.py", "--config", config, "--attacks", "badnet_rs",
            "--rates", "0.25,0.1,0.5", "--start", "0.25"]
    _run([*args, "--out", str(tmp_path / "a"), "--target", "0"], capsys)  # every rate succeeds: walk down
    found = json.loads((tmp_path / "a" / "backdoors.json").read_text())
    assert [t["rate"] for t in found["tried"]] == [0.25, 0.1]
    assert found["lowest"]["badnet_rs"]["rate"] == 0.1 and "missed" not in found["lowest"]["badnet_rs"]
    _run([*args, "--out", str(tmp_path / "b"), "--target", "1.01"], capsys)  # none does: walk up, then give up
    missed = json.loads((tmp_path / "b" / "backdoors.json").read_text())
    assert [t["rate"] for t in missed["tried"]] == [0.25, 0.5]
    assert missed["lowest"]["badnet_rs"]["missed"] and missed["lowest"]["badnet_rs"]["rate"] == 0.5
    assert "| 0.5 (missed) |" in (tmp_path / "b" / "backdoors.md").read_text()


def test_fare_measurement_compares_defenses_and_checks_apgd_against_pgd(tmp_path, capsys):
    out = tmp_path / "bench"
    stdout = _run(["scripts/measure_fare.py", "--config", f"{REPO}/configs/micro-bench.yaml", "--out", str(out),
                   "--steps", "2", "--max-images", "8", "--eps", "4/255"], capsys)
    summary = json.loads((out / "fare-measurement.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["poisoned", "ft", "par", "cleanclip", "fare", "never-poisoned"]
    for m in summary["models"]:
        assert 0 <= m["apgd@4/255"] <= m["pgd10@4/255"] + 1e-9 and 0 <= m["clean_accuracy"] <= 1
    assert summary["apgd_not_weaker_than_pgd10_everywhere"] is True
    assert summary["anchors_robustvlm_vit_l14"]["FARE^4"] == [61.1, 45.9, 32.4]
    assert "APGD <= PGD-10 everywhere: True" in stdout
    assert not (out / "results.csv").exists()  # the benchmark's own report is left alone


def test_eftclip_measurement_reports_detection_per_attack(tmp_path, capsys):
    import yaml

    config = yaml.safe_load(open(f"{REPO}/configs/micro-bench.yaml"))
    for stage in ("foundation", "poison_finetune", "clean"):  # a profile elsewhere names the repo's stage files
        config[stage] = f"{REPO}/configs/{config[stage]}"
    config["defense_settings"]["eftclip"] = {"objective_params": {"train_logit_scale": False},
                                             "eftclip": {"oracle_params": {"epochs": 1}, "object_list_size": 9}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "bench"
    stdout = _run(["scripts/measure_eftclip.py", "--config", str(tmp_path / "bench.yaml"), "--out", str(out),
                   "--attacks", "badnet_rs"], capsys)
    summary = json.loads((out / "eftclip-measurement.json").read_text())
    (entry,) = summary["attacks"]
    assert entry["attack"] == "badnet_rs" and 0 <= entry["auroc"] <= 1 and "eftclip" in entry["cleaned"]
    assert summary["victim_found_for_every_attack"] == (entry["victims"] == ["banana"])
    assert "victim 'banana' found for every attack" in stdout and not (out / "results.csv").exists()
    # an older benchmark's eftclip row in results.csv is shown neither as this run's nor beside it
    header = "attack,defense,setting,seed,ca,asr,status\n"
    (out / "results.csv").write_text(header + "badnet_rs,eftclip,default,0,0.123,0.456,ok\n"
                                      "badnet_rs,ft,default,0,0.5,0.25,ok\n")
    _run(["scripts/measure_eftclip.py", "--config", str(tmp_path / "bench.yaml"), "--out", str(out),
          "--attacks", "badnet_rs"], capsys)
    (again,) = json.loads((out / "eftclip-measurement.json").read_text())["attacks"]
    assert again["cleaned"]["eftclip"] == entry["cleaned"]["eftclip"] != [12.3, 45.6]
    assert again["cleaned"]["ft"] == [50.0, 25.0]


def test_loader_throughput_measures_csv_and_shards(tmp_path, capsys):
    out = tmp_path / "loader.jsonl"
    stdout = _run(["scripts/loader_throughput.py", "--make-jpegs", "24", "--jpeg-size", "40", "--size", "32",
                   "--model", "par-micro-vit", "--batch", "8", "--workers", "0", "1", "--batches", "2",
                   "--warmup", "1", "--work", str(tmp_path / "work"), "--step-rate", "50", "--out", str(out)], capsys)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["workers"]) for r in records] == [("csv", 0), ("csv", 1), ("shards", 0), ("shards", 1)]
    for r in records:
        assert r["images_per_s"] > 0 and abs(r["ratio_to_step"] - r["images_per_s"] / 50) < 0.01
    assert (tmp_path / "work" / "24x40px" / "shards" / "sizes.json").is_file()  # kept by count and size
    assert "x step" in stdout
    records_before = len(records)
    throughput = tmp_path / "train.jsonl"
    throughput.write_text(json.dumps({"model": "ViT-B-32", "samples_per_s": 5.0}) + "\n" +
                          json.dumps({"model": "par-micro-vit", "samples_per_s": 40.0}) + "\n")
    _run(["scripts/loader_throughput.py", "--data", str(tmp_path / "work" / "24x40px" / "jpeg" / "pairs.csv"),
          "--size", "32", "--model", "par-micro-vit", "--batch", "8", "--workers", "0", "--batches", "2",
          "--warmup", "0", "--step-rate", str(throughput), "--out", str(out)], capsys)
    (last,) = [json.loads(line) for line in out.read_text().splitlines()][records_before:]
    assert abs(last["ratio_to_step"] - last["images_per_s"] / 40) < 0.01  # this model's step, not another's


def test_device_check_runs_its_stages_and_reports_them(tmp_path):
    """scripts/device_check.sh, every GPU check in one command, dry-run on the CPU (micro model)."""
    env = {**os.environ, "DEVICE_CHECK_DRY": "1", "PY": sys.executable, "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", "scripts/device_check.sh", "env", "throughput", "tests", "scan"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    assert "done: env throughput tests scan; failed: none; skipped (run again with these): none" in summary
    assert "one real scan (30 labels, 8 images, fp32, random weights)" in summary
    assert json.loads((out / "scan_cost.json").read_text())["run"]["rank_seconds_per_label"] > 0  # 30 > top_k + 10
    assert "| cpu | par-micro-vit | par | 8 | amp_bf16 | no | no | synthetic |" in summary
    assert "tests collected" in (out / "cuda_tests.log").read_text()
    assert "torch" in (out / "env.txt").read_text() and (out / "profile.txt").is_file()
    assert len(list(out.iterdir())) <= 8  # the documented output files, nothing else

    late = subprocess.run(["bash", "scripts/device_check.sh", "memory"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "OUT": str(tmp_path / "late"), "DEVICE_CHECK_BUDGET_S": "0"}, timeout=120)
    assert late.returncode == 0 and "skipped (run again with these): memory" in late.stdout
    bad = subprocess.run(["bash", "scripts/device_check.sh", "env", "warp"], cwd=REPO, capture_output=True,
                         text=True, env={**env, "OUT": str(tmp_path / "bad")}, timeout=60)
    assert bad.returncode == 2 and "unknown stage 'warp'" in bad.stdout


def test_scan_cost_counts_each_phase_at_the_scanners_settings(tmp_path, capsys):
    out = tmp_path / "cost.json"
    stdout = _run(["scripts/scan_cost.py", "--model", "par-micro-vit", "--labels", "40", "--images", "16",
                   "--timing-images", "4", "--timing-steps", "1", "--device", "cpu", "--scanner-param", "steps=7",
                   "--out", str(out)], capsys)
    record = json.loads(out.read_text())
    phases = {p["phase"]: p["count"] for p in record["phases"]}
    # 40 labels > top_k 10 + 10 reference: all ranked (10 steps + the final forward), 20 inverted fully (7 + 1)
    assert record["pruned"] and record["inverted_fully"] == 20
    assert phases["ranking pass"] == 40 * 11 * 16
    cost = record["seconds_per_stamped_image"]["patch"]
    assert cost["step"] > 0 and cost["forward"] > 0  # timed apart
    assert phases["full inversion (patch)"] == phases["full inversion (blend)"] == 20 * 8 * 16
    assert phases["refinement (flagged label)"] == 200 * 16 and phases["zero-shot classifier"] == 40 * 80
    assert record["total_seconds"] > 0 and "| **total** |" in stdout and record["precision"] == "fp32"
    small = json.loads(out.read_text()) if _run(["scripts/scan_cost.py", "--model", "par-micro-vit", "--labels", "12",
                                                 "--images", "16", "--timing-images", "4", "--timing-steps", "1",
                                                 "--device", "cpu", "--out", str(out)], capsys) else None
    assert not small["pruned"] and small["inverted_fully"] == 12 and "ranking pass" not in str(small["phases"])



def test_scan_cost_runs_one_real_scan_beside_its_estimate(tmp_path, capsys):
    stdout = _run(["scripts/scan_cost.py", "--model", "par-micro-vit", "--labels", "25", "--images", "8",
                   "--timing-images", "4", "--timing-steps", "1", "--device", "cpu", "--scanner-param", "steps=2",
                   "--scanner-param", "refine_steps=3", "--run", tmp_path / "run", "--out", tmp_path / "cost.json"],
                  capsys)
    run = json.loads((tmp_path / "cost.json").read_text())["run"]
    assert run["images"] == 8 and run["labels"] == 25 and run["precision"] == "fp32" and run["seconds"] > 0
    # 25 > top_k 10 + 10 reference labels: all ranked, then the top 10 and the reference ones not among them
    assert 10 < run["inverted_fully"] <= 20 and run["rank_seconds_per_label"] > 0
    assert len(list((tmp_path / "run" / "images").glob("*.jpg"))) == 8
    assert len((tmp_path / "run" / "classnames.txt").read_text().split("\n")) == 26  # 25 names and the last newline
    assert "one real scan (25 labels, 8 images, fp32, random weights)" in stdout
    assert _script("scan_cost.py").main(["--model", "par-micro-vit", "--labels", "1001", "--run",
                                         str(tmp_path / "never")]) == 2
    assert "ImageNet's 1,000 classes" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_invert_quality_holds_hard_attacks_to_the_floor_and_the_others_to_par(tmp_path, capsys):
    import csv
    fields = ["attack", "defense", "setting", "seed", "poisoned_ca", "ca", "asr", "status"]
    rows = [("tri_patt", "never-poisoned", 0, 0.932, 0.007), ("tri_patt", "par", 0, 0.905, 0.52),
            ("tri_patt", "invert", 0, 0.925, 0.010), ("tri_patt", "invert", 1, 0.923, 0.020),  # ASR 1.5 <= 1.7
            ("tri_patt", "par+invert", 0, 0.900, 0.005),  # CA 90.0 < 93.6 - 2
            ("random", "never-poisoned", 0, 0.932, 0.009), ("random", "par", 0, 0.844, 0.001),
            ("random", "invert", 0, 0.893, 0.077), ("random", "par+invert", 0, 0.844, 0.001)]
    with (tmp_path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for attack, defense, seed, ca, asr in rows:
            writer.writerow({"attack": attack, "defense": defense, "setting": "default", "seed": seed,
                             "poisoned_ca": 0.936 if attack == "tri_patt" else 0.896, "ca": ca, "asr": asr,
                             "status": "ok"})
    out = _run(["scripts/invert_quality.py", tmp_path / "results.csv", "--out", tmp_path / "bar.json"], capsys)
    passes = {(r["attack"], r["defense"]): r["passes"] for r in json.loads((tmp_path / "bar.json").read_text())}
    assert passes == {("tri_patt", "invert"): True, ("tri_patt", "par+invert"): False,
                      ("random", "invert"): False, ("random", "par+invert"): True}
    assert "bar met on 2 of 2 attacks" in out
    assert _script("invert_quality.py").main([str(tmp_path / "missing.csv")]) == 2


def test_patch_overlap_measures_the_mask_on_the_planted_patch():
    import torch

    overlap = _script("scan_overlap.py").patch_overlap
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:8, 4:8] = 1.0  # all of it on a 4-px patch at (4, 4)
    assert overlap(mask, 4, 4, 4) == {"patch_share": 1.0, "over_uniform": 16.0, "top_pixels_on_patch": 1.0,
                                      "centre": "5.5,5.5"}
    half = mask.clone()
    half[0, 12:16, 12:16] = 1.0  # half of it elsewhere
    got = overlap(half, 4, 4, 4)
    assert got["patch_share"] == 0.5 and got["over_uniform"] == 8.0 and got["centre"] == "9.5,9.5"
    assert overlap(torch.full((16, 16), 0.3), 0, 8, 4)["over_uniform"] == pytest.approx(1.0)  # uniform: 1
    with pytest.raises(ParError, match="does not fit"):
        overlap(mask, 14, 0, 4)


def test_scan_overlap_plants_the_patch_where_asked_and_reports_each_trigger(tmp_path, capsys):
    out = tmp_path / "overlap"
    stdout = _run(["scripts/scan_overlap.py", "--config", f"{REPO}/configs/micro-backdoor.yaml", "--out", out,
                   "--places", "12,12", "--scanners", "decree", "--stamp-at", "12,12;0,0"], capsys)
    with open(out / "overlap.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "stamped.csv") as f:
        stamped = list(csv.DictReader(f))
    assert [(r["planted"], r["stamped"]) for r in stamped] == [("12,12", "12,12"), ("12,12", "0,0")]
    assert float(stamped[0]["asr"]) == pytest.approx(float(rows[0]["asr"]))  # stamped where planted: the model's ASR
    assert 0 <= float(stamped[1]["asr"]) <= 1 and "| 12,12 | " in (out / "stamped.md").read_text()
    assert [r["trigger"].split(" ")[0] for r in rows] == ["toward-target", "decree"]
    assert all(r["place"] == "12,12" and float(r["asr"]) >= 0.9 for r in rows)  # the backdoor was learnt there
    for r in rows:
        assert 0 <= float(r["patch_share"]) <= 1 and float(r["over_uniform"]) == pytest.approx(
            float(r["patch_share"]) * 16, rel=1e-6)  # an 8-px patch is 1/16 of the 32-px image
    assert "| 12,12 |" in stdout and (out / "overlap.md").exists()
    poisoned = [p for p in out.iterdir() if p.name.startswith("poison-badnet_rs-")]
    manifest = next(poisoned[0].glob("*.json")).read_text()
    assert '"top": 12' in manifest and '"left": 12' in manifest


@pytest.mark.parametrize("option", [["--places", "25,0"], ["--stamp-at", "0,0;0,25"], ["--stamp-at", "0;1"]])
def test_scan_overlap_refuses_a_place_the_patch_does_not_fit_before_any_work(option, tmp_path, capsys):
    out = tmp_path / "overlap"
    code = _script("scan_overlap.py").main(["--config", f"{REPO}/configs/micro-backdoor.yaml", "--out", str(out),
                                            *option])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()  # checked before anything is made


def test_scan_overlap_reads_what_a_profile_extends(tmp_path, capsys):
    """configs/micro-backdoor-p32.yaml names only its foundation: the patch size and the world's image size come
    from the profile it extends (a 25-px row does not fit its 8-px patch in 32-px images)."""
    out = tmp_path / "overlap"
    code = _script("scan_overlap.py").main(["--config", f"{REPO}/configs/micro-backdoor-p32.yaml", "--out", str(out),
                                            "--places", "25,0"])
    assert code == 2 and "8-px patch at (25, 0) does not fit the world's 32-px images" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("option", [["--report", "x"], ["--config=configs/bench-tau.yaml"]])
def test_benchmark_sh_refuses_a_report_or_profile_that_would_replace_every_parts(option):
    env = dict(os.environ, PAR_PYTHON=sys.executable)
    run = subprocess.run(["bash", "scripts/benchmark.sh", *option], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "runs each profile into its own report" in run.stderr


def test_benchmark_sh_runs_every_part_and_exits_non_zero_when_one_failed(tmp_path):
    """A part with failed cells writes its tables and exits non-zero; the others still run, and the end says so."""
    fake = tmp_path / "python"
    log = tmp_path / "calls.txt"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
                    '[[ "$*" == *"configs/bench.yaml"* ]] && { echo "error: 1 of 9 cells failed" >&2; exit 2; }\n'
                    'exit 0\n')
    fake.chmod(0o755)
    run = subprocess.run(["bash", "scripts/benchmark.sh", "--out", str(tmp_path / "b")], cwd=REPO,
                         env=dict(os.environ, PAR_PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert len(calls) == 6 and "configs/bench-synthetic.yaml" in calls[-1]  # every part ran
    assert run.returncode == 1 and "1 part(s) of the benchmark failed" in run.stderr
    assert "configs/bench.yaml" in run.stderr.splitlines()[-1]
