"""EftCLIP: oracles, the CLIP-oracle disagreement rule, victim ranking, detection metrics, the eftclip defense."""
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import micro_profile
from par import models
from par.app.cli import main
from par.defenses import DEFENSES, CleaningJob
from par.defenses.eftclip.detection import disagreements, rank_victims
from par.eval.metrics import auroc, detection_metrics, tpr_at_fpr
from par.errors import ParError
from par.defenses.eftclip.oracles import ORACLES, OracleContext, caption_labels, make_oracle

NAMES = ["banana", "car", "cup"]


def test_disagreement_rule_on_hand_made_views():
    clip = torch.tensor([[0.90, 0.05, 0.05],   # CLIP sure of banana, the oracle sees a car: a trigger
                         [0.05, 0.90, 0.05],   # both see the car
                         [0.50, 0.30, 0.20],   # CLIP unsure (< theta): no claim from CLIP
                         [0.10, 0.10, 0.80]])  # CLIP and oracle agree on the cup, but the caption names banana
    oracle = torch.tensor([[0.05, 0.90, 0.05],
                           [0.05, 0.90, 0.05],
                           [0.20, 0.70, 0.10],
                           [0.02, 0.08, 0.90]])
    captions = ["a car.", "a car.", "a car.", "a photo of a banana."]
    rows = disagreements(clip, oracle, captions, NAMES, theta=0.66, object_list_size=1)
    assert [r["flagged"] for r in rows] == [True, False, False, True]
    assert [r["unsupported"] for r in rows] == [[0], [], [], [0]]
    assert rows[0]["score"] == pytest.approx(0.90 * 0.95) and rows[3]["score"] == pytest.approx(1.0 * 0.98)
    assert rows[1]["score"] == pytest.approx(max(0.90 * 0.10, 1.0 * 0.10))
    assert [r["flagged"] for r in disagreements(clip, oracle, captions, NAMES, 0.66, 1, ["clip"])] == [True, False, False, False]
    # a longer object list (tau 3) holds every class: nothing is unsupported
    assert not any(r["flagged"] for r in disagreements(clip, oracle, captions, NAMES, 0.66, 3))
    # a class the oracle gives 0 (a detector saw none) is not on its list, however long the list is
    seen_none = disagreements(clip[:1], torch.tensor([[0.0, 0.9, 0.0]]), ["a car."], NAMES, 0.66, 3)
    assert seen_none[0]["flagged"] and seen_none[0]["unsupported"] == [0]
    # a class the oracle is blind to (no detector category) is not judged: its 0 says nothing
    blind = disagreements(clip, oracle, captions, NAMES, 0.66, 1, sees=[False, True, True])
    assert [r["flagged"] for r in blind] == [False, False, False, False] and blind[3]["unjudged"] == [0]
    assert all(0 not in r["claims"] for r in blind)
    assert {e["label"]: e["claims"] for e in rank_victims(blind, NAMES)}[NAMES[0]] == 0  # nor counted


def test_victim_ranking_prefers_the_over_flagged_label():
    rows = [{"claims": {0: 1.0}, "unsupported": [0], "flagged": True} for _ in range(8)]  # banana: always unsupported
    rows += [{"claims": {1: 1.0}, "unsupported": [1], "flagged": True} for _ in range(2)]  # car: the oracle's misses
    rows += [{"claims": {1: 1.0}, "unsupported": [], "flagged": False} for _ in range(30)]
    ranking = rank_victims(rows, NAMES)
    assert [v["label"] for v in ranking] == ["banana", "cup", "car"]
    z = 6.0 / (8 * 0.25 * 0.75 * (1 + 8 / 40)) ** 0.5  # the screened claims' noise and the rate's (from 40 rows)
    assert ranking[0] == {"label": "banana", "flagged_claims": 8, "claims": 8, "expected": 2.0, "excess": 6.0,
                          "z": round(z, 2), "significant": True}
    assert ranking[2]["excess"] == pytest.approx(2 - 0.25 * 32) and not ranking[2]["significant"]


def _claims(label, flagged, total):
    return ([{"claims": {label: 1.0}, "unsupported": [label], "flagged": True} for _ in range(flagged)]
            + [{"claims": {label: 1.0}, "unsupported": [], "flagged": False} for _ in range(total - flagged)])


def test_calibrated_ranking_discounts_the_oracles_blind_spot():
    # the oracle misses cups half the time on any pair; bananas it sees, except on the 60 triggered pairs
    screened = _claims(0, 60 + 5, 300) + _claims(1, 30, 600) + _claims(2, 300, 600)
    reference = _claims(0, 1, 50) + _claims(1, 2, 100) + _claims(2, 50, 100)  # held-out clean pairs
    assert rank_victims(screened, NAMES)[0]["label"] == "cup"  # against the overall flag rate: the blind spot wins
    ranking = rank_victims(screened, NAMES, reference)
    assert ranking[0]["label"] == "banana" and ranking[0]["significant"]
    banana_rate = (1 + 10 * 53 / 250) / (50 + 10)  # its clean rate, shrunk towards the overall one by 10 claims
    assert ranking[0]["expected"] == pytest.approx(banana_rate * 300, abs=0.01)
    cup = next(v for v in ranking if v["label"] == "cup")
    assert cup["excess"] < ranking[0]["excess"] / 2 and cup["z"] < 3 and not cup["significant"]


def test_calibration_keeps_the_captions_and_clips_claims_apart():
    def claims(label, flagged, total, captioned):
        return [{**r, "caption_labels": [label] if captioned else []} for r in _claims(label, flagged, total)]

    # clean pairs: the oracle misses 1 banana in 25; the poisoned CLIP's lone banana claims are mostly wrong
    reference = claims(0, 4, 100, True) + claims(0, 18, 20, False) + claims(1, 4, 100, True)
    # screened: 60 poisoned pairs captioned banana, all flagged, on top of the clean rates
    screened = claims(0, 60 + 12, 360, True) + claims(0, 18, 20, False) + claims(1, 12, 300, True)
    (banana,) = [v for v in rank_victims(screened, NAMES, reference) if v["label"] == "banana"]
    caption_rate, clip_rate = (4 + 10 * 8 / 200) / 110, (18 + 10 * 18 / 20) / 30
    assert banana["expected"] == pytest.approx(360 * caption_rate + 20 * clip_rate, abs=0.01)
    assert banana["excess"] == pytest.approx(90 - 360 * caption_rate - 20 * clip_rate, abs=0.01) and banana["excess"] > 55
    # one rate for both sources charges the captioned claims with CLIP's mistakes: the poison is hidden
    merged = [{k: v for k, v in r.items() if k != "caption_labels"} for r in screened]
    merged_ref = [{k: v for k, v in r.items() if k != "caption_labels"} for r in reference]
    assert next(v for v in rank_victims(merged, NAMES, merged_ref) if v["label"] == "banana")["excess"] < banana["excess"] / 2


def test_no_victim_on_clean_pairs():
    screened = _claims(0, 12, 300) + _claims(1, 25, 600) + _claims(2, 300, 600)  # flag rates as on clean pairs
    reference = _claims(0, 2, 50) + _claims(1, 2, 100) + _claims(2, 50, 100)
    assert not any(v["significant"] for v in rank_victims(screened, NAMES, reference))


def test_detection_metrics_against_known_truth():
    truth = [1, 1, 0, 0, 0, 0]
    assert auroc([0.9, 0.8, 0.1, 0.2, 0.3, 0.4], truth) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8, 0.7, 0.6], truth) == 0.0
    assert auroc([0.5] * 6, truth) == 0.5  # ties count half
    scores = [0.9, 0.35, 0.1, 0.2, 0.3, 0.4]
    assert tpr_at_fpr(scores, truth, fpr=0.0) == 0.5  # no clean row may pass: the threshold is 0.4
    assert tpr_at_fpr(scores, truth, fpr=0.25) == 1.0  # one of four may (0.4): the threshold drops to 0.3
    metrics = detection_metrics([0.9, 0.8, 0.1, 0.2, 0.3, 0.4], [True, False, True, False, False, False], truth)
    assert metrics["detection_rate"] == 0.5 and metrics["false_positive_rate"] == 0.25 and metrics["precision"] == 0.5
    with pytest.raises(ParError, match="both poisoned and clean"):
        auroc([0.1, 0.2], [0, 0])


def test_caption_labels_need_exactly_one_class():
    assert caption_labels(["two bananas", "a car and a cup", "a tree"], NAMES) == [0, None, None]


@pytest.fixture(scope="module")
def world_oracle(micro_world, tmp_path_factory):
    names = (micro_world / "classnames.txt").read_text().split()
    return make_oracle("world-classifier", OracleContext(
        names, clean_data=str(micro_world / "clean.csv"), workdir=str(tmp_path_factory.mktemp("oracles")),
        params={"epochs": 2}, progress=False)), names


def test_world_oracle_learns_only_from_clean_pairs_and_is_cached(micro_world, world_oracle, tmp_path):
    oracle, names = world_oracle
    manifest = json.loads(oracle.manifest_path.read_text())
    assert manifest["trained_on"] == str((micro_world / "clean.csv").resolve())
    assert manifest["classnames"] == names and manifest["rows"]  # the clean rows whose caption names one class
    train_rows = (micro_world / "train.csv").read_text()
    assert manifest["trained_on_digest"] != __import__("par.utils", fromlist=["x"]).file_digest(micro_world / "train.csv")
    assert "images/clean/" in (micro_world / "clean.csv").read_text() and "images/clean/" not in train_rows
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    conf = oracle.confidences(images)
    assert conf.shape == (4, len(names)) and torch.allclose(conf.sum(dim=1), torch.ones(4))
    again = make_oracle("world", OracleContext(names, clean_data=str(micro_world / "clean.csv"),
                                               workdir=str(oracle.manifest_path.parent.parent), params={"epochs": 2},
                                               progress=False))
    assert torch.equal(again.confidences(images), conf)  # loaded from its cache, not retrained
    poisoned = tmp_path / "poisoned.csv"
    poisoned.write_text("image,caption,poisoned\n" + "\n".join(
        f"{micro_world}/images/clean/{i:06d}.png,a banana.,{int(i == 0)}" for i in range(20)))
    with pytest.raises(ParError, match="has poisoned rows: the oracle learns from clean data only"):
        make_oracle("world-classifier", OracleContext(names, clean_data=str(poisoned), workdir=str(tmp_path)))


def test_a_world_oracle_is_the_same_whatever_the_caller_drew_before_and_leaves_its_stream(micro_world, tmp_path):
    names = (micro_world / "classnames.txt").read_text().split()
    weights = []
    for seed in (1, 2):  # two processes' histories: the first cell of a benchmark to need the oracle trains it
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        oracle = make_oracle("world-classifier", OracleContext(
            names, clean_data=str(micro_world / "clean.csv"), workdir=str(tmp_path / str(seed)),
            params={"epochs": 1}, progress=False))
        assert torch.equal(torch.get_rng_state(), state)
        weights.append(oracle.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_eftclip_refuses_senseless_victim_settings():
    from par.defenses.eftclip import EftCLIPParams

    with pytest.raises(ParError, match="victim_weight must be at least 1"):
        EftCLIPParams(victim_weight=0)
    with pytest.raises(ParError, match="victims must be between 0 and 5"):
        EftCLIPParams(victims=6)


def test_torchvision_detector_plugin_runs_with_the_users_weights(tmp_path):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    weights = tmp_path / "detector.pth"
    torch.save(fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(),
               weights)
    oracle = make_oracle("torchvision-detector", OracleContext(["car", "banana", "shoggoth"],
                                                               params={"weights": str(weights), "min_score": 0.0}))
    conf = oracle.confidences(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert conf.shape == (2, 3) and (conf >= 0).all() and (conf <= 1).all() and (conf[:, 2] == 0).all()
    assert oracle.sees() == [True, True, False]  # COCO has no shoggoth
    from par.defenses.eftclip.detection import judging

    # a blind oracle's detections were judged otherwise before: its settings say by which rule; others' are as they were
    assert judging("detector") == {"judging": 2} and judging("world-classifier") == {}
    with pytest.raises(ParError, match="needs its COCO weights .*download https://download.pytorch.org/models/"):
        make_oracle("detector", OracleContext(["car"], params={"weights": str(tmp_path / "missing.pth")}))
    torch.save({"nope": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ParError, match="is not a fasterrcnn_mobilenet_v3_large_320_fpn state dict"):
        make_oracle("detector", OracleContext(["car"], params={"weights": str(tmp_path / "wrong.pth")}))


@pytest.fixture(scope="module")
def poisoned_setup(micro_world, tmp_path_factory):
    """A micro poisoned dataset (BadNet-Stripes on banana) and a checkpoint to screen it with."""
    from par.attacks.poison import PoisonConfig, poison

    out = tmp_path_factory.mktemp("poisoned")
    data = poison(PoisonConfig(csv=str(micro_world / "train.csv"), attack="badnet_rs", label="banana",
                               out=str(out / "data"), num=12, templates=str(micro_world / "templates.txt")),
                  progress=False)
    torch.manual_seed(0)
    return data, models.save_checkpoint(models.create_model("par-micro-vit"), out / "model.pt")


def test_detect_cli_writes_detections_and_metrics(capsys, micro_world, poisoned_setup, tmp_path):
    data, checkpoint = poisoned_setup
    args = ["detect", "--checkpoint", str(checkpoint), "--model", "par-micro-vit", "--data", str(data),
            "--classnames", str(micro_world / "classnames.txt"), "--clean-data", str(micro_world / "clean.csv"),
            "--label", "banana", "--out", str(tmp_path / "det"), "--oracle-cache", str(tmp_path / "shared"),
            "--oracle-param", "epochs=1"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "det" / "summary.json").read_text())
    rows = list(csv.DictReader((tmp_path / "det" / "detections.csv").open()))
    assert len(rows) == summary["rows"] == 96 and summary["flagged"] == sum(int(r["flagged"]) for r in rows)
    assert summary["metrics"]["poisoned_rows"] == 12 and 0 <= summary["metrics"]["auroc"] <= 1
    assert summary["label"] == "banana" and summary["victim_found"] == (summary["victim"] == "banana")
    poisoned_rows = [i for i, line in enumerate(list(csv.DictReader(open(data)))) if line["poisoned"] == "1"]
    assert all(rows[i]["caption_labels"] == "banana" for i in poisoned_rows)  # the planted captions
    # a fifth of the clean pairs calibrates the ranking; the oracle never learnt from them
    calibration = summary["calibration"]
    held = [r["image"] for r in csv.DictReader(open(tmp_path / "det" / "clean-split" / "calibration.csv"))]
    learnt = [r["image"] for r in csv.DictReader(open(calibration["oracle_trained_on"]))]
    clean = [str((micro_world / r["image"]).resolve()) for r in csv.DictReader(open(micro_world / "clean.csv"))]
    assert calibration["pairs"] == len(held) == round(0.2 * len(clean)) and sorted(held + learnt) == sorted(clean)
    (manifest,) = (tmp_path / "shared").glob("world-classifier-*/manifest.json")  # --oracle-cache: shared
    assert json.loads(manifest.read_text())["trained_on"] == calibration["oracle_trained_on"]
    assert all(v["expected"] >= 0 and "z" in v for v in summary["victims"])
    assert main(args) == 0  # the same detection again: reused
    elsewhere = [a if a != str(tmp_path / "det") else str(tmp_path / "det2") for a in args]
    assert main(elsewhere + ["--workers", "1", "--batch-size", "7"]) == 0  # decoded by a worker, other batches
    assert (tmp_path / "det2" / "detections.csv").read_text() == (tmp_path / "det" / "detections.csv").read_text()
    assert main(args[:-1] + ["epochs=2"]) == 2  # other settings in the same folder: refused
    assert "holds a detection with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--oracle": "nope"}, "unknown oracle 'nope'; known: torchvision-detector, world-classifier"),
    ({"--label": "dragon"}, "target label 'dragon' is not a class"),
    ({"--oracle": "torchvision-detector"}, "needs its COCO weights"),
    ({"--calibrate": "1"}, "need 0 <= calibrate < 1"),
    ({"--workers": "-1"}, "detect workers must be a whole number of at least 0, got -1"),
    ({"--clean-data": None}, "calibrating the victim ranking needs the defender's clean pairs"),
])
def test_detect_bad_input(capsys, micro_world, poisoned_setup, tmp_path, change, message):
    data, checkpoint = poisoned_setup
    args = {"--checkpoint": str(checkpoint), "--model": "par-micro-vit", "--data": str(data),
            "--classnames": str(micro_world / "classnames.txt"), "--clean-data": str(micro_world / "clean.csv"),
            "--out": str(tmp_path / "det"), **change}
    assert main(["detect"] + [x for kv in args.items() if kv[1] is not None for x in kv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "det" / "summary.json").exists()


def test_detect_refuses_data_without_captions(capsys, micro_world, poisoned_setup, tmp_path):
    _, checkpoint = poisoned_setup
    assert main(["detect", "--checkpoint", str(checkpoint), "--model", "par-micro-vit", "--data",
                 str(micro_world / "test.csv"), "--classnames", str(micro_world / "classnames.txt"),
                 "--out", str(tmp_path / "det")]) == 2
    assert "lacks column(s) ['caption']" in capsys.readouterr().err


def test_eftclip_defense_drops_flagged_pairs_and_fine_tunes(micro_world, poisoned_setup, tmp_path):
    data, checkpoint = poisoned_setup
    settings = {"steps": 2, "batch_size": 16, "warmup": 1, "lr": 1e-4, "threads": 1, "progress": False,
                "objective_params": {"train_logit_scale": False},
                "eftclip": {"oracle_params": {"epochs": 1}, "object_list_size": 9}}  # a micro oracle knows little: a long list
    job = CleaningJob(checkpoint=str(checkpoint), model="par-micro-vit", train_data=str(micro_world / "clean.csv"),
                      out=str(tmp_path / "eft"), settings=settings, poisoned_data=str(data),
                      classnames=str(micro_world / "classnames.txt"), templates=str(micro_world / "templates.txt"))
    cleaned = DEFENSES.get("eftclip").clean(job)
    assert cleaned == tmp_path / "eft" / "finetune" / "checkpoint.pt" and cleaned.exists()
    report = json.loads((tmp_path / "eft" / "defense-report.json").read_text())
    (detection,) = (tmp_path / "eftclip-detections").iterdir()  # beside the run: shared by other seeds' runs
    assert report["detection"]["folder"] == str(detection)
    flagged = [r["flagged"] == "1" for r in csv.DictReader((detection / "detections.csv").open())]
    curated = list(csv.DictReader((tmp_path / "eft" / "curate" / "curated.csv").open()))
    assert report["dropped"] == sum(flagged)
    assert len(curated) == len(flagged) - sum(flagged) + report["victim_pairs_upweighted"] == report["curated_pairs"]
    assert list(ORACLES) == ["torchvision-detector", "world-classifier"]
    assert (tmp_path / "oracles").is_dir()  # oracles are kept beside the run folder, shared by a benchmark's cells
    # the same folder asked again under another detection setting: its curated pairs are not taken for the new
    # detection's; they are curated anew, and the fine-tune on the old ones is refused, not reused
    other = {**settings, "eftclip": {**settings["eftclip"], "object_list_size": 3}}
    with pytest.raises(ParError, match=r"made with other settings \(differs in \['train_data_digest'\]\)"):
        DEFENSES.get("eftclip").clean(CleaningJob(**{**vars(job), "settings": other, "reuse": True}))
    again = json.loads((tmp_path / "eft" / "defense-report.json").read_text())
    assert again["detection"]["folder"] != str(detection) and Path(again["detection"]["folder"]).parent == detection.parent
    assert len(list(csv.DictReader((tmp_path / "eft" / "curate" / "curated.csv").open()))) == again["curated_pairs"]
    # a barely trained oracle (1 epoch, BatchNorm statistics left lagging) contradicts every pair
    everything = {**settings, "eftclip": {"oracle_params": {"epochs": 1, "precise_bn": False}, "object_list_size": 1, "theta": 0.01}}
    with pytest.raises(ParError, match="flagged all 96 pairs: nothing is left"):
        DEFENSES.get("eftclip").clean(CleaningJob(**{**vars(job), "settings": everything, "out": str(tmp_path / "e3")}))
    with pytest.raises(ParError, match="screens the data the model was poisoned with"):
        DEFENSES.get("eftclip").clean(CleaningJob(checkpoint=str(checkpoint), model="par-micro-vit",
                                                  train_data=str(micro_world / "clean.csv"), out=str(tmp_path / "e2"),
                                                  settings=settings, classnames=str(micro_world / "classnames.txt")))


def test_micro_bench_with_an_eftclip_column_and_detection_table(tmp_path, micro_cache):
    from dataclasses import replace

    from par.app.bench import run_bench

    profile = micro_profile("micro-bench.yaml", micro_cache)
    profile = replace(profile, quick={**profile.quick, "defenses": ["eftclip"], "synthetic_cleaning": None},
                      defense_settings={"eftclip": {"objective_params": {"train_logit_scale": False},
                                                    "eftclip": {"oracle_params": {"epochs": 1}, "object_list_size": 9}}})
    run_bench(profile, str(tmp_path / "out"), quick=True, progress=False)
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    eft = [r for r in rows if r["defense"] == "eftclip"]
    assert len(eft) == 1 and eft[0]["status"] == "ok" and eft[0]["detection_victim"]
    assert 0 <= float(eft[0]["detection_auroc"]) <= 1
    assert eft[0]["detection_victim_found"] == str(eft[0]["detection_victim"] == "banana")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| attack | poisoned CA | poisoned ASR | never-poisoned CA | never-poisoned ASR | eftclip CA | eftclip ASR |" in text
    assert "| `badnet_rs` | eftclip | " in text.split("Detection of poisoned training pairs")[1]


def test_precise_bn_recomputes_the_running_statistics_on_the_training_images():
    from par.defenses.eftclip.oracles import SmallCNN, WorldClassifier, WorldClassifierParams

    oracle = WorldClassifier.__new__(WorldClassifier)  # the re-estimation step alone, on a random net
    oracle.model, oracle.params, oracle.device = SmallCNN(3), WorldClassifierParams(batch_size=16), torch.device("cpu")
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    oracle._precise_bn(images)
    conv, norm = oracle.model.features[0], oracle.model.features[1]
    with torch.no_grad():
        out = conv(images.float() / 255)
    assert torch.allclose(norm.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert norm.momentum == 0.1 and norm.num_batches_tracked == 3


def test_the_detection_table_counts_a_seed_that_found_no_victim():
    """A seed whose detection found no victim label is a miss in the table's count and means, not left out;
    a cell without a detection (no report) is left out."""
    eftclip = DEFENSES.get("eftclip")
    rows = [{"attack": "badnet_rs", "defense": "eftclip", "detection_victim": "", "detection_victim_found": "False",
             "detection_auroc": "0.5", "detection_tpr_at_5pct_fpr": "0.1", "detection_rate": "0.2",
             "detection_false_positive_rate": "0.05"},
            {"attack": "badnet_rs", "defense": "eftclip", "detection_victim": "banana", "detection_victim_found": "True",
             "detection_auroc": "0.9", "detection_tpr_at_5pct_fpr": "0.5", "detection_rate": "0.6",
             "detection_false_positive_rate": "0.01"},
            {"attack": "badnet_rs", "defense": "eftclip"}]  # no detection ran
    line = [l for l in eftclip.tables(rows, ["badnet_rs"], "banana") if l.startswith("| `badnet_rs`")]
    assert line == ["| `badnet_rs` | eftclip | banana/none (1/2) | 0.700 | 30.0 | 40.0 | 3.0 |"]
