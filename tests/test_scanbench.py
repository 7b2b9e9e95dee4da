"""The scan table: scanners on the benchmark's poisoned models and clean controls, in the benchmark and alone."""
import csv
import json
from pathlib import Path

import pytest

from conftest import micro_profile
from par.app import scanbench
from par.app.bench import run_bench
from par.errors import ParError

SCAN = {"scanners": ["decree"], "zero_poison_seeds": [1], "benign_seeds": [0], "max_images": 32,
        "scanner_params": {"decree": {"steps": 40}}}  # the table's plumbing, not DECREE's statistic


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_benchmark_scans_poisoned_model_and_every_clean_control(micro_cache, tmp_path):
    profile = micro_profile("micro-bench.yaml", micro_cache, attacks=["badnet_rs"], defenses=["ft"], scan=SCAN,
                            reference=False)
    out = run_bench(profile, str(tmp_path / "bench"), progress=False)
    rows = _rows(out / "scan.csv")
    assert [(r["scanner"], r["kind"], r["attack"]) for r in rows] == [
        ("decree", "poisoned", "badnet_rs"), ("decree", "clean", ""), ("decree", "clean", ""), ("decree", "clean", "")]
    assert [r["model"] for r in rows[1:]] == ["foundation", "0 % poison, seed 1", "benign fine-tune, seed 0"]
    scanned = Path(rows[0]["folder"]).parent  # the scan lies beside what it scanned
    assert scanned.name.startswith("poisoned-badnet_rs-") and (scanned / "checkpoint.pt").is_file()
    cells = _rows(out / "results.csv")  # every cell names the poisoned model's ASR
    assert cells and all(float(rows[0]["asr"]) == pytest.approx(float(c["poisoned_asr"])) for c in cells)
    for row in rows:  # each row is its scan.json's verdict and margin
        record = json.loads((Path(row["folder"]) / "scan.json").read_text())
        assert (row["flagged"] == "True") == (record["verdict"] == "backdoored")
        assert float(row["margin"]) == pytest.approx(record["threshold"] - record["value"], abs=1e-6)  # flagged below
    report = (out / "results.md").read_text()
    assert "Checkpoint scans" in report and "| `decree` | poisoned (badnet_rs) |" in report
    # the controls are distinct models: three clean checkpoints, none the poisoned one
    assert len({r["folder"].rsplit("/scan-", 1)[0] for r in rows}) == 4

    # alone, under a report name of its own: the same models, the scans reused
    again = scanbench.run_scan_bench(profile, str(tmp_path / "alone"), progress=False, report="scanners")
    assert [(r["model"], r["margin"]) for r in _rows(again / "scanners.csv")] == [(r["model"], r["margin"]) for r in rows]
    assert (again / "scanners.md").is_file() and not (again / "scan.csv").exists()


def test_scan_table_side_by_side_trains_the_benchmarks_one_thread_models(micro_cache, tmp_path):
    """jobs 2: the poisoned model and the controls are trained two at a time, one thread each: the models
    the benchmark trains with the same jobs (what the table alone then reuses)."""
    profile = micro_profile("micro-bench.yaml", micro_cache, attacks=["badnet_rs"], defenses=["ft"], scan=SCAN,
                            reference=False, synthetic_cleaning=None)
    with pytest.raises(ParError, match="scan jobs must be a whole number >= 1"):
        scanbench.run_scan_bench(profile, str(tmp_path / "none"), jobs=0)
    bench = _rows(run_bench(profile, str(tmp_path / "bench"), progress=False, jobs=2) / "scan.csv")
    alone = _rows(scanbench.run_scan_bench(profile, str(tmp_path / "alone"), progress=False, jobs=2) / "scan.csv")
    assert [r["folder"] for r in alone] == [r["folder"] for r in bench]  # the same scans of the same models
    one_thread = [Path(r["folder"]).parent for r in bench if r["model"] != "foundation"]
    assert len(one_thread) == 3 and all("threads: 1" in (m / "config.yaml").read_text() for m in one_thread)


def test_summary_counts_auroc_rates_and_targets():
    row = lambda kind, margin, flagged, target="", asr=None: {  # noqa: E731
        "scanner": "s", "kind": kind, "margin": margin, "flagged": flagged, "named_target": target == "banana",
        "top_label": target, "asr": asr, "seconds": 2.0}
    rows = [row("poisoned", 3.0, True, "banana", 0.99), row("poisoned", -0.5, False, "", 0.5),
            row("clean", -1.0, False), row("clean", 0.2, True), row("clean", -2.0, False)]
    (s,) = scanbench.summarize(rows, "banana")
    assert (s["poisoned"], s["backdoored"], s["clean"], s["clean_flagged"], s["named"]) == (2, 1, 3, 1, 1)
    assert s["tpr"] == 0.5
    assert s["auroc"] == pytest.approx(5 / 6)  # 3.0 beats all three clean margins, -0.5 beats two
    assert s["auroc_backdoored"] == 1.0
    assert scanbench.margin({"value": 0.3, "threshold": 0.1, "flagged_when": "below the threshold"}) == pytest.approx(-0.2)
    assert scanbench.margin({"value": 5.0, "threshold": 3.8, "flagged_when": "above the threshold"}) == pytest.approx(1.2)


def test_scan_part_refuses_bad_values_and_a_profile_without_it(micro_cache, tmp_path):
    for bad, words in [({"images": "holdout"}, "world split"), ({"scanners": []}, "at least one scanner"),
                       ({"scanners": ["nope"]}, "nope"), ({"benign_seeds": [1, 1]}, "twice"),
                       ({"zero_poison_seeds": [-1]}, ">= 0"), ({"max_images": 0}, "max_images"),
                       ({"threshold": 3}, "threshold")]:
        with pytest.raises(ParError, match=words):
            micro_profile("micro-backdoor.yaml", micro_cache, scan=bad)
    with pytest.raises(ParError, match="no 'scan' part"):
        scanbench.run_scan_bench(micro_profile("micro-backdoor.yaml", micro_cache), str(tmp_path))


def test_the_scan_table_checks_label_and_attack_parameters_before_any_work(tmp_path):
    profile = micro_profile("micro-scan.yaml", tmp_path / "cache", attacks=["blended"],
                            attack_params={"blended": {"alpah": 0.2}})
    with pytest.raises(ParError, match="alpah"):
        scanbench.run_scan_bench(profile, str(tmp_path / "out"))
    with pytest.raises(ParError, match="profile label 'bananna' is not a class of the world"):
        scanbench.run_scan_bench(micro_profile("micro-scan.yaml", tmp_path / "cache", label="bananna"),
                                 str(tmp_path / "out"))
    no_threshold = micro_profile("micro-scan.yaml", tmp_path / "cache", scan={"scanners": ["patch-compactness"]})
    with pytest.raises(ParError, match="patch-compactness has no threshold for par-micro-vit"):
        scanbench.run_scan_bench(no_threshold, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
