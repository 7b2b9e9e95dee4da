"""Checkpoint scans on the micro world: the poisoned micro model (a fixed 8-px BadNet-Stripes patch at
rows/columns 22..29 toward ``banana``) is flagged with its target, its clean foundation is not, and the
scan's inputs, folder and registry behave as the CLI promises."""
import csv
import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import cli_error
from par.app.cli import main
from par.errors import ParError
from par.scan import SCANNERS, InvertedTrigger, ScanConfig, Scanner, ScanResult, mask_place, robust_z, scan_checkpoint
from par.scan import inversion
from par.scan.compactness import window_share
from par.scan.run import scan_request

CHEAP = {"steps": 5, "families": ["patch"], "refine_steps": 0}  # for tests of plumbing, not of the statistic


def config(world, checkpoint, images=None, **changes) -> ScanConfig:
    settings = dict(model="par-micro-vit", classnames=str(world / "classnames.txt"),
                    templates=str(world / "templates.txt"), progress=False)
    return ScanConfig(checkpoint=str(checkpoint), images=str(images or world / "test.csv"), **{**settings, **changes})


def argv(world, checkpoint, out, *extra):
    return ["scan", "--checkpoint", str(checkpoint), "--model", "par-micro-vit", "--images", str(world / "test.csv"),
            "--classnames", str(world / "classnames.txt"), "--templates", str(world / "templates.txt"),
            "--out", str(out), *extra]


def test_robust_z_is_median_and_mad_based():
    assert robust_z([1.0, 2.0, 3.0, 4.0, 100.0])[4] == pytest.approx((100 - 3) / 1.4826)
    assert robust_z([5.0, 5.0, 5.0]) == [0.0, 0.0, 0.0]
    z = robust_z([9.0, 1.0], reference=[1.0, 2.0, 3.0])  # against another set's median and MAD
    assert z == pytest.approx([(9 - 2) / 1.4826, (1 - 2) / 1.4826])


def test_mask_place_is_the_centre_of_mass_and_the_box_of_the_strong_pixels():
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:8, 10:14] = 1.0
    mask[0, 0, 0] = 0.2  # weak: moves the centre, not the box
    assert mask_place(mask) == {"centre": [5.4, 11.4], "box": [4, 10, 7, 13]}  # (16 * 5.5) / 16.2, (16 * 11.5) / 16.2
    assert mask_place(torch.full((1, 8, 8), 0.3)) == {"centre": [3.5, 3.5], "box": [0, 0, 7, 7]}  # a blend's mask
    assert mask_place(torch.zeros(8, 8)) is None


def test_the_poisoned_micro_model_is_flagged_with_its_target(poisoned_scan):
    """The default scanner on the poisoned micro model (the scan ``invert`` runs, on the clean pairs' images)."""
    _, folder = poisoned_scan
    result = json.loads((folder / "scan.json").read_text())
    assert result["verdict"] == "backdoored" and result["target"] == "banana" and result["scanner"] == "label-inversion"
    assert result["value"] >= result["threshold"] and "clean micro models" in result["threshold_source"]
    banana = max(row["z"] for row in result["labels"] if row["label"] == "banana")
    others = max(row["z"] for row in result["labels"] if row["label"] != "banana")
    assert banana == result["value"] and banana > others + 1  # the natural hub (car) comes next, well behind
    assert len({row["label"] for row in result["labels"]}) == 12 and not result["details"]["pruned"]
    assert result["seconds_per_label"] > 0 and all(row["seconds"] > 0 for row in result["labels"])
    assert result["details"]["refined"]["label"] == "banana" and result["details"]["refined"]["success"] >= 0.99


@pytest.fixture(scope="module")
def place_recording_micro(micro_cache, tmp_path_factory):
    """configs/micro-backdoor-p32.yaml built: the same patch, label and poisoning as the poisoned micro model,
    on the micro encoder whose one token is the whole image, so that the backdoor is tied to its place."""
    from conftest import Backdoored, micro_profile

    return Backdoored(micro_profile("micro-backdoor-p32.yaml", micro_cache), tmp_path_factory.mktemp("p32"))


def test_a_planted_patch_is_flagged_named_and_drawn_where_it_was_planted(place_recording_micro):
    """A model poisoned with a fixed patch: ``patch-compactness`` flags it, names its target, and the trigger it
    draws lies on the patch. par-micro-vit's 8-px tokens share one embedding, so its backdoor fires with the
    patch at any token-aligned place and says nothing of which one it was planted at; this encoder's backdoor
    fires at the planted place alone, which the test checks first."""
    from par.app import pipeline
    from par.scan import trigger_toward

    b = place_recording_micro
    params = b.attack_params
    top, left, size = params["top"], params["left"], params["patch_size"]
    assert (top, left, size) == (22, 22, 8)

    def asr_at(row, column):
        moved = {**params, "top": row, "left": column}
        return pipeline.evaluate_stage(b.world, b.poisoned.checkpoint, b.attack, b.label, moved, b.profile.eval)[
            "asr_top1"]

    assert asr_at(top, left) >= 0.9 and asr_at(top - 8, left - 8) <= 0.1  # par-micro-vit: ~95 % at both
    shadow = config(b.world.path, b.poisoned.checkpoint, images=b.world.path / "clean.csv", model="par-micro-vit-p32",
                    scanner="patch-compactness")
    result = scan_checkpoint(shadow)
    assert result.flagged and result.target == "banana" and result.family == "patch"
    assert "clean par-micro-vit-p32 models" in result.threshold_source
    shares = sorted(row["share"] for row in result.labels)
    assert result.details["pruned"] and len(shares) == 10  # the ranking pass keeps top_k of the 12 labels
    assert result.value == shares[-1] >= shares[-2] + 0.2  # no other label's trigger is close
    mask = result.trigger.mask.reshape(32, 32)
    on_patch = torch.zeros(32, 32, dtype=torch.bool)
    on_patch[top:top + size, left:left + size] = True
    share = float(mask[on_patch].sum() / mask.sum())
    largest = mask.flatten().topk(size * size).indices
    assert share >= 0.5  # 16x a uniform mask's 1/16
    assert float(on_patch.flatten()[largest].float().mean()) >= 0.5  # as many of its largest pixels as the patch has
    toward, success = trigger_toward(shadow, "banana")  # what invert unlearns, with trigger_from: target
    assert success >= 0.99 and torch.equal(toward.mask, result.trigger.mask)


def test_patch_compactness_leaves_the_clean_foundation(place_recording_micro):
    b = place_recording_micro
    result = scan_checkpoint(config(b.world.path, b.foundation, images=b.world.path / "clean.csv",
                                    model="par-micro-vit-p32", scanner="patch-compactness"))
    assert not result.flagged and result.target is None and result.value < result.threshold


def test_window_share_is_the_masks_mass_in_its_best_window():
    mask = torch.zeros(1, 16, 16)
    mask[0, 2:6, 8:12] = 1.0
    assert window_share(mask, 4) == 1.0 and window_share(mask, 2) == 0.25
    mask[0, 15, 0] = 4.0  # as much mass again as a quarter of the square, far from it
    assert window_share(mask, 4) == pytest.approx(16 / 20)
    assert window_share(torch.full((1, 16, 16), 0.2), 4) == pytest.approx(1 / 16)  # spread evenly: the window's area
    assert window_share(torch.zeros(8, 8), 4) == 0.0


def test_the_clean_foundation_is_not_flagged(backdoored_micro):
    result = scan_checkpoint(config(backdoored_micro.world.path, backdoored_micro.foundation))
    assert not result.flagged and result.verdict == "clean" and result.target is None
    assert result.value < result.threshold


def test_the_statistic_does_not_depend_on_the_order_of_the_images(backdoored_micro, tmp_path):
    """Images are sorted by path before they are sampled or batched, so a shuffled list and the folder
    the images live in give the same scan exactly (the same floats, summed in the same order)."""
    world = backdoored_micro.world.path
    with open(world / "test.csv") as f:
        rows = [str(world / row["image"]) for row in csv.DictReader(f)]
    random.Random(1).shuffle(rows)
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("image\n" + "\n".join(rows) + "\n")
    settings = dict(scanner_params=CHEAP, max_images=48)
    listed = scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, shuffled, **settings))
    folder = scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, world / "images" / "test", **settings))
    assert [(r["label"], r["lift"], r["z"]) for r in listed.labels] == [(r["label"], r["lift"], r["z"]) for r in folder.labels]
    assert listed.value == folder.value and listed.settings["images_used"] == 48


def test_a_bf16_scan_runs_and_is_not_the_same_scan_as_fp32(backdoored_micro):
    """bf16 autocast (the default on CUDA) on the CPU: the stamped images' embeddings come out in fp32 and the
    scan completes; the precision is part of the request, so a folder of the other precision is not reused."""
    world = backdoored_micro.world.path
    exact = config(world, backdoored_micro.poisoned.checkpoint, scanner_params=CHEAP, max_images=16)
    assert "precision" not in scan_request(exact)  # auto on the CPU: fp32
    bf16 = replace(exact, precision="amp_bf16")
    assert scan_request(bf16) == {**scan_request(exact), "precision": "amp_bf16"}
    result = scan_checkpoint(bf16)
    assert result.settings["precision_used"] == "amp_bf16" and result.settings["precision"] == "amp_bf16"
    assert len(result.labels) == 12 and all(math.isfinite(r["lift"]) and math.isfinite(r["z"]) for r in result.labels)
    assert result.trigger.pattern.dtype == torch.float32


def test_shadow_images_in_parts_give_the_whole_batchs_inversion(backdoored_micro, monkeypatch):
    """batch_images below the shadow image count (a large encoder's setting) sends each label's images through
    in parts whose gradients add up: the same triggers, statistics and refined trigger as in one pass."""
    world = backdoored_micro.world.path
    params = {"steps": 4, "families": ["patch", "blend"], "refine_steps": 6, "success_target": 1e-6,
              "thresholds": {"patch": -100.0, "blend": -100.0}}  # flagged whatever it finds: the refinement runs
    flag = {"max_images": 16}
    whole = scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, scanner_params=params, **flag))
    from par.scan.base import ScanContext

    logits, differentiated = ScanContext.logits, []

    def spy(self, images):  # the size of every forward pass a gradient is taken through
        if images.requires_grad:
            differentiated.append(images.shape[0])
        return logits(self, images)

    monkeypatch.setattr(ScanContext, "logits", spy)
    parts = scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, **flag,
                                   scanner_params={**params, "batch_images": 6}))  # parts of 6, 6 and 4 images
    assert differentiated and max(differentiated) == 6 and 4 in differentiated
    for a, b in zip(whole.labels, parts.labels):
        assert a["label"] == b["label"] and a["lift"] == pytest.approx(b["lift"], abs=1e-4)
        assert a["z"] == pytest.approx(b["z"], abs=1e-3)
    for family in params["families"]:
        assert torch.allclose(whole.triggers[family].mask, parts.triggers[family].mask, atol=1e-5)
    refined = whole.details["refined"], parts.details["refined"]
    assert refined[0]["size"] == pytest.approx(refined[1]["size"], abs=1e-5) and refined[0]["success"] == refined[1]["success"]


def test_candidate_pruning_keeps_the_target(backdoored_micro):
    """With more labels than top_k + reference_labels, a short inversion of every label ranks them; the
    planted label is ranked first and kept, and z is measured against randomly drawn reference labels."""
    world = backdoored_micro.world.path
    result = scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, top_k=3,
                                    scanner_params={"steps": 1, "families": ["patch"], "reference_labels": 5,
                                                    "refine_steps": 0}))
    assert result.details["pruned"] and result.details["ranking"][0]["label"] == "banana"
    assert "banana" in result.details["top_k"] and len(result.details["top_k"]) == 3
    assert len(result.details["reference"]) == 5 and result.details["rank_seconds_per_label"] > 0
    assert {r["label"] for r in result.labels} == set(result.details["top_k"]) | set(result.details["reference"])


@pytest.fixture
def constant_scanner():
    """A scanner registered the way a user's module would, removed after the test."""

    @SCANNERS.register("always-clean")
    class AlwaysClean(Scanner):
        name = "always-clean"

        def scan(self, ctx):
            _, h, w = ctx.images.shape[1:]
            trigger = InvertedTrigger(torch.zeros(1, h, w), torch.zeros(3, h, w), "patch", 0.0)
            return ScanResult(scanner=self.name, flagged=False, statistic="nothing", value=0.0, threshold=1.0,
                              threshold_source="a test", triggers={"patch": trigger})

    yield "always-clean"
    SCANNERS.remove("always-clean")


def test_a_registered_scanner_is_found_by_the_cli(backdoored_micro, constant_scanner, tmp_path, capsys):
    b = backdoored_micro
    assert main(argv(b.world.path, b.foundation, tmp_path / "s", "--scanner", constant_scanner)) == 0
    record = json.loads((tmp_path / "s" / "scan.json").read_text())
    assert record["scanner"] == "always-clean" and record["verdict"] == "clean"
    assert "always-clean" in capsys.readouterr().out


def test_the_cli_writes_reuses_and_refuses(backdoored_micro, tmp_path, capsys, monkeypatch):
    b = backdoored_micro
    out = tmp_path / "scan"
    cheap = ["--scanner-param", "steps=5", "--scanner-param", "families=[patch]", "--scanner-param", "refine_steps=0",
             "--max-images", "32"]
    assert main(argv(b.world.path, b.poisoned.checkpoint, out, *cheap)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", "scan.json", "trigger.png", "trigger.safetensors"]
    record = json.loads((out / "scan.json").read_text())
    assert record["verdict"] in ("backdoored", "clean") and record["threshold_source"]
    assert record["settings"]["scanner_params"]["steps"] == 5 and record["seconds_per_label"] > 0
    top, left, bottom, right = record["trigger"]["place"]["box"]
    assert 0 <= top <= bottom < 32 and 0 <= left <= right < 32  # where trigger.png's trigger lies, in pixels
    assert f"rows {top}-{bottom}, columns {left}-{right}" in capsys.readouterr().out
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) >= {"label", "family", "size", "z", "success", "seconds"}
    capsys.readouterr()
    stamp = (out / "scan.json").stat().st_mtime_ns
    assert main(argv(b.world.path, b.poisoned.checkpoint, out, *cheap)) == 0
    assert "reusing the finished scan" in capsys.readouterr().out
    assert (out / "scan.json").stat().st_mtime_ns == stamp
    error = cli_error(capsys, argv(b.world.path, b.poisoned.checkpoint, out, *cheap, "--seed", "1"))
    assert "another request" in error and "'seed'" in error
    error = cli_error(capsys, argv(b.world.path, b.foundation, out, *cheap))
    assert "checkpoint_digest" in error
    monkeypatch.setitem(inversion.Z_THRESHOLDS, "patch", inversion.Z_THRESHOLDS["patch"] + 1)  # a new calibration
    error = cli_error(capsys, argv(b.world.path, b.poisoned.checkpoint, out, *cheap))
    assert "another request" in error and "'documented_threshold'" in error  # the old verdict is not served
    assert (out / "scan.json").stat().st_mtime_ns == stamp


def test_decree_flags_the_poisoned_micro_encoder_names_its_target_and_leaves_the_foundation(backdoored_micro):
    """DECREE's PL1 is smaller for the poisoned micro encoder than for its clean foundation, the micro
    encoder's own threshold (set on clean models of other worlds) tells them apart, and the label the
    stamped images collapse onto is the backdoor's target."""
    b = backdoored_micro
    poisoned = scan_checkpoint(config(b.world.path, b.poisoned.checkpoint, scanner="decree"))
    clean = scan_checkpoint(config(b.world.path, b.foundation, scanner="decree"))
    assert poisoned.details["reached"] and clean.details["reached"] and poisoned.direction == "below"
    assert poisoned.value < clean.value
    assert poisoned.flagged and poisoned.target == "banana" and poisoned.details["top_label_share"] > 0.5
    assert not clean.flagged and clean.target is None
    assert poisoned.threshold < 0.1 and "clean par-micro-vit models" in poisoned.threshold_source


def test_decree_text_flags_the_poisoned_micro_encoder_by_its_collapse_point_and_leaves_the_foundation(
        backdoored_micro, tmp_path, capsys):
    """The poisoned encoder's collapse point lies nearer the target's text than any test image does (gap > 0,
    the target named by it); the foundation's lies farther from every label's text than some image does.
    Through the CLI: labels.csv holds one row per label with the scanner's own columns."""
    b = backdoored_micro
    clean = scan_checkpoint(config(b.world.path, b.foundation, scanner="decree-text"))
    assert clean.details["reached"] and clean.direction == "above" and clean.threshold == 0
    assert not clean.flagged and clean.target is None and clean.value < 0
    out = tmp_path / "scan"
    assert main(argv(b.world.path, b.poisoned.checkpoint, out, "--scanner", "decree-text")) == 0
    assert "decree-text): backdoored: target 'banana'" in capsys.readouterr().out
    record = json.loads((out / "scan.json").read_text())
    gaps = {row["label"]: row["gap"] for row in record["labels"]}
    assert record["target"] == "banana" and record["value"] == gaps["banana"] == max(gaps.values()) > 0
    assert record["details"]["pl1"] < 0.1 and "0 by what it means" in record["threshold_source"]
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["label", "collapse_cosine", "nearest_image_cosine", "gap"]
    for row in rows:
        assert float(row["gap"]) == pytest.approx(float(row["collapse_cosine"]) - float(row["nearest_image_cosine"]),
                                                  abs=1e-5)


def test_the_request_digests_the_images_used_by_their_bytes_and_top_k_only_where_read(backdoored_micro, tmp_path):
    b = backdoored_micro
    folder = _write_images(tmp_path / "shadow", 10, b.world.path)
    request = scan_request(config(b.world.path, b.foundation, images=folder))
    (folder / "notes.txt").write_text("not an image")  # not a shadow image: the same scan
    assert scan_request(config(b.world.path, b.foundation, images=folder)) == request
    first, second = sorted(folder.iterdir())[:2]
    first.write_bytes(second.read_bytes())  # a picture replaced under its name: another scan
    assert scan_request(config(b.world.path, b.foundation, images=folder))["images_digest"] != request["images_digest"]
    assert request["top_k"] == 10  # label-inversion ranks labels; DECREE's target is read off, nothing ranked
    assert "top_k" not in scan_request(config(b.world.path, b.foundation, images=folder, scanner="decree"))


def test_label_inversion_takes_a_threshold_per_family_and_refuses_one_for_two(backdoored_micro, tmp_path, capsys):
    """Its two families' z spread differently on clean models (documented 3.8 and 10.5): one number for both
    is refused before any work; per family, or one number for one family, is taken."""
    b = backdoored_micro
    error = cli_error(capsys, argv(b.world.path, b.foundation, tmp_path / "s", "--threshold", "5"))
    assert "one threshold cannot serve ['patch', 'blend']" in error and "thresholds={patch: 5.0" in error
    assert not (tmp_path / "s").exists()
    cheap = {"steps": 2, "refine_steps": 0}
    for params, families, expected in (({"thresholds": {"patch": -50.0}}, ["patch", "blend"], {"patch": -50.0, "blend": 10.5}),
                                       ({}, ["blend"], {"blend": -60.0})):
        result = scan_checkpoint(config(b.world.path, b.foundation, max_images=16, threshold=None if params else -60.0,
                                        scanner_params={**cheap, **params, "families": families}))
        assert result.details["thresholds"] == expected and result.flagged  # z is never below -50 here
        assert result.threshold_source == "given by the user"
    with pytest.raises(ParError, match="families \\['blend'\\] not scanned"):
        scan_checkpoint(config(b.world.path, b.foundation, scanner_params={"families": ["patch"],
                                                                          "thresholds": {"blend": 1.0}}))


def test_a_memory_bound_does_not_make_another_scan_but_a_setting_of_the_inversion_does(backdoored_micro):
    """label-inversion's batch_images sends the images in parts whose gradients add up to the whole's: the same
    scan at any value (a finished one is reused); its steps, or DECREE's minibatch size, change the scan."""
    b = backdoored_micro
    request = lambda **changes: scan_request(config(b.world.path, b.foundation, **changes))  # noqa: E731
    whole = request()
    assert request(scanner_params={"batch_images": 16}) == whole and "batch_images" not in whole["scanner_params"]
    assert request(scanner_params={"steps": 29}) != whole
    assert request(scanner="decree", scanner_params={"batch_size": 16}) != request(scanner="decree")


def test_a_class_name_listed_twice_by_imagenet_is_one_candidate(backdoored_micro):
    """OpenAI's ImageNet names list 'missile' and 'sunglasses' twice: twin classifier columns would lift each
    other's trigger and tie under argmax, so the second of each is left out of the candidates, and said so."""
    from open_clip import IMAGENET_CLASSNAMES
    from par.scan.run import check, first_of_each_name

    names = list(IMAGENET_CLASSNAMES)
    kept = first_of_each_name(names)
    assert len(kept) == 998 and 657 in kept and 744 not in kept and 836 in kept and 837 not in kept
    assert first_of_each_name(["cat", "Dog", "dog ", "cat", "bird"]) == [0, 1, 4]
    b = backdoored_micro
    cfg = config(b.world.path, b.foundation, classnames="imagenet")
    assert check(cfg)[3] == kept
    assert scan_request(cfg)["twins_left_out"] == ["missile", "sunglasses"]
    assert "twins_left_out" not in scan_request(config(b.world.path, b.foundation))  # the world's names: none


def test_the_trigger_toward_a_label_keeps_the_scans_memory_bound_and_names_it_when_memory_runs_out(
        backdoored_micro, monkeypatch):
    from par.scan import trigger_toward

    b = backdoored_micro
    bounds = []

    def refine(self, ctx, label):
        bounds.append(self.params.batch_images)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(inversion.LabelInversion, "refine", refine)
    for scanner, params in (("label-inversion", {"batch_images": 16}), ("decree-text", {"batch_size": 24}),
                            ("label-inversion", {})):
        with pytest.raises(ParError, match="ran out of device memory: lower the scan's scanner_params"):
            trigger_toward(config(b.world.path, b.poisoned.checkpoint, scanner=scanner, scanner_params=params), "banana")
    assert bounds == [16, 24, 640]  # the last: label-inversion's default


def _write_images(folder, count, world):
    folder.mkdir()
    sources = sorted((world / "images" / "test").iterdir())[:count]
    for source in sources:
        shutil.copy(source, folder / source.name)
    return folder


def test_bad_inputs_are_one_line_errors_and_write_nothing(backdoored_micro, tmp_path, capsys):
    b = backdoored_micro
    world, poisoned = b.world.path, b.poisoned.checkpoint
    out = tmp_path / "never"

    def error(*changes, images=None, checkpoint=poisoned, model=None):
        args = argv(world, checkpoint, out, *changes)
        if images is not None:
            args[args.index("--images") + 1] = str(images)
        if model is not None:
            args[args.index("--model") + 1] = model
        message = cli_error(capsys, args)
        assert not out.exists()
        return message

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in error(images=empty)
    assert "at least 8 images" in error(images=_write_images(tmp_path / "three", 3, world))
    broken = _write_images(tmp_path / "broken", 10, world)
    (broken / "zz-not-an-image.png").write_text("not a picture")
    message = error(images=broken)
    assert "cannot decode image" in message and "zz-not-an-image.png" in message
    assert "par-micro-vit" in error(model="par-tiny-vit")
    twice = tmp_path / "classnames.txt"
    twice.write_text((world / "classnames.txt").read_text() + "banana\n")
    assert "'banana' twice" in error("--classnames", str(twice))
    assert "['grape']" in error("--labels", "banana,grape,apple,kite,car")
    assert "more than once" in error("--labels", "banana,banana,apple,kite,car")
    assert "at least 5 candidate labels" in error("--labels", "banana,apple")
    assert "precision must be auto or one of" in error("--precision", "fp8")
    message = error("--scanner", "patch-compactness")  # no threshold measured for this encoder
    assert "patch-compactness has no threshold for par-micro-vit" in message and "--threshold" in message
    assert "window must be in (0, 1]" in error("--scanner", "patch-compactness", "--threshold", "0.5",
                                               "--scanner-param", "window=0")
    assert "threshold must be a finite number, got nan" in error("--threshold", "nan")
    assert "must be finite numbers, got {'mask_init': inf}" in error("--scanner-param", "mask_init=.inf")
    message = error("--max-images", "3")
    assert "at least 8 images" in message and "of which max_images keeps 3" in message
    twice_listed = tmp_path / "twice.csv"
    first = (world / "test.csv").read_text().splitlines()[:8]
    twice_listed.write_text("\n".join(first + [first[1]]) + "\n")  # seven images in eight rows: one image, twice
    (twice_listed.parent / "images").symlink_to(world / "images")
    assert "needs at least 8 images; " + f"{twice_listed} names 7 distinct ones" in error(images=twice_listed)
    state = torch.load(b.foundation, map_location="cpu", weights_only=True)
    state["state_dict"]["logit_scale"] = torch.tensor(1e4)  # finite, but its exp overflows: infinite logits
    hot = tmp_path / "hot.pt"
    torch.save(state, hot)
    assert "non-finite loss" in error(checkpoint=hot)


def test_running_out_of_device_memory_names_the_scanners_batch_setting(backdoored_micro, monkeypatch):
    world = backdoored_micro.world.path

    def out_of_memory(self, ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(inversion.LabelInversion, "scan", out_of_memory)
    with pytest.raises(ParError, match="the label-inversion scan ran out of device memory: lower --scanner-param "
                                       "batch_images \\(now 640\\)"):
        scan_checkpoint(config(world, backdoored_micro.poisoned.checkpoint, scanner_params=CHEAP, max_images=16))


def test_a_scan_stopped_while_writing_its_files_is_run_again_not_refused(backdoored_micro, tmp_path, capsys,
                                                                         monkeypatch):
    """Files a scan of this request left before its scan.json (the folder a benchmark names by the request) are
    its own: the scan runs again there. Files without that record are still refused."""
    from par.scan import folder as scan_folder

    b = backdoored_micro
    out = tmp_path / "scan"
    cheap = ["--scanner-param", "steps=5", "--scanner-param", "families=[patch]", "--scanner-param", "refine_steps=0",
             "--max-images", "32"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(scan_folder, "draw_trigger", stopped)  # after labels.csv, before scan.json
        assert main(argv(b.world.path, b.poisoned.checkpoint, out, *cheap)) == 130
    assert (out / "labels.csv").exists() and not (out / "scan.json").exists()
    assert main(argv(b.world.path, b.poisoned.checkpoint, out, *cheap)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["labels.csv", "scan.json", "trigger.png", "trigger.safetensors"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.csv").write_text("label\n")  # no record of which scan wrote it
    assert "but no scan.json" in cli_error(capsys, argv(b.world.path, b.poisoned.checkpoint, other, *cheap))
