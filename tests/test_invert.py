"""invert / par+invert: the unlearning term, unlearning a handed-in trigger, the fallback, bad input."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from par import attacks, models
from par.defenses import DEFENSES, TaskContext, make_objective
from par.defenses.base import Batch
from par.scan.files import load_trigger, save_trigger
from par.errors import ParError


def true_trigger(backdoored, path):
    """The planted trigger as a mask and pattern: stamped black = m p, stamped white = 1 - m + m p."""
    size = backdoored.profile.world["image_size"]
    black, white = torch.zeros(1, 3, size, size), torch.ones(1, 3, size, size)
    params = backdoored.attack_params
    on_black = attacks.apply(backdoored.attack, black, seed=0, **params)[0]
    on_white = attacks.apply(backdoored.attack, white, seed=0, **params)[0]
    mask = (1 - (on_white - on_black)).mean(0, keepdim=True).clamp(0, 1)
    pattern = torch.where(mask > 0, on_black / mask.clamp_min(1e-6), torch.zeros_like(on_black)).clamp(0, 1)
    return save_trigger(path, mask, pattern)


def test_unlearning_term_is_zero_for_an_empty_trigger(tmp_path):
    torch.manual_seed(0)
    model = models.create_model("par-micro-vit").eval()
    empty = save_trigger(tmp_path / "empty.safetensors", torch.zeros(1, 32, 32), torch.rand(3, 32, 32))
    full = save_trigger(tmp_path / "full.safetensors", torch.ones(1, 32, 32), torch.rand(3, 32, 32))
    from open_clip import ClipLoss

    mean, std = models.image_mean_std(model)
    context = TaskContext(contrastive=ClipLoss(), mean=mean, std=std)
    raw = (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8)
    from par.augment import normalize
    from par.data import to_float

    batch = Batch(normalize(to_float(raw), mean, std), models.get_tokenizer("par-micro-vit")(["a cat"] * 4), raw)
    for name in ("clip-unlearn", "par-unlearn"):
        terms = make_objective(name, {"trigger": str(empty)}, model, context)(model, batch)
        assert float(terms["unlearn"].detach()) < 1e-10  # the copy being cleaned starts as the frozen model
        moved = make_objective(name, {"trigger": str(full), "weight": 2.0}, model, context)(model, batch)
        assert float(moved["unlearn"].detach()) > 1e-3  # a trigger covering the image moves every embedding
        # the loss is the plain objective's plus weight x the unlearning term
        plain = make_objective({"clip-unlearn": "clip", "par-unlearn": "par"}[name], {}, model, context)(model, batch)
        assert torch.allclose(moved["loss"], plain["loss"] + 2.0 * moved["unlearn"], atol=1e-5)


def test_handed_in_true_trigger_removes_more_of_the_backdoor_than_ft(backdoored_micro, tmp_path):
    trigger = true_trigger(backdoored_micro, tmp_path / "true.safetensors")
    steps = 40
    ft = DEFENSES.get("ft").clean(backdoored_micro.job(tmp_path / "ft", steps=steps))
    given = {"invert": {"trigger": str(trigger)}}
    inverted = DEFENSES.get("invert").clean(backdoored_micro.job(tmp_path / "invert", given, steps=steps))
    report = json.loads((tmp_path / "invert" / "defense-report.json").read_text())
    assert report["unlearned"] and report["scan"]["verdict"] == "given"
    asr_ft = backdoored_micro.evaluate(ft)["asr_top1"]
    asr_invert = backdoored_micro.evaluate(inverted)["asr_top1"]
    assert asr_invert < asr_ft - 0.2, (asr_invert, asr_ft)
    logged = [json.loads(line) for line in (tmp_path / "invert" / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert "unlearn" in logged[-1]


def test_scan_finding_nothing_falls_back_to_the_base_objective(backdoored_micro, tmp_path):
    decree = {"invert": {"scanner": "decree"}}  # any scanner that finds nothing; decree is the cheaper
    job = backdoored_micro.job(tmp_path / "run", decree, steps=3, checkpoint=backdoored_micro.foundation)
    cleaned = DEFENSES.get("par+invert").clean(job)
    report = json.loads((tmp_path / "run" / "defense-report.json").read_text())
    assert report["scan"]["verdict"] == "clean" and not report["unlearned"] and "found no backdoor" in report["note"]
    config = (tmp_path / "run" / "finetune" / "config.yaml").read_text()
    assert "objective: par\n" in config and cleaned.is_file()
    assert DEFENSES.get("par+invert").report(tmp_path / "run", "banana") == {"scan_verdict": "clean", "scan_target": ""}


def test_scan_flags_the_poisoned_model_and_unlearning_uses_its_trigger(backdoored_micro, poisoned_scan, tmp_path):
    found, scanned = poisoned_scan
    assert found["verdict"] == "backdoored" and found["target"] == "banana"
    assert scanned.parent.name == "invert-scans"  # beside the run: other seeds' runs share it
    shutil.copytree(scanned, tmp_path / "invert-scans" / scanned.name)  # as another seed's run left it
    DEFENSES.get("invert").clean(backdoored_micro.job(tmp_path / "run", steps=2))
    report = json.loads((tmp_path / "run" / "defense-report.json").read_text())
    assert report["scan"]["target"] == "banana" and report["unlearned"]
    mask, pattern = load_trigger(report["scan"]["trigger"])
    assert mask.shape == (1, 32, 32) and pattern.shape == (3, 32, 32)
    (scan,) = (tmp_path / "invert-scans").iterdir()
    assert (scan / "scan.json").is_file() and report["scan"]["folder"] == str(scan)
    DEFENSES.get("par+invert").clean(backdoored_micro.job(tmp_path / "again", steps=2))
    assert list((tmp_path / "invert-scans").iterdir()) == [scan]  # the same request: the same scan


def test_the_trigger_toward_the_scans_target_is_unlearnt_when_asked(backdoored_micro, tmp_path):
    """``trigger_from: target``: Neural Cleanse's trigger toward the label the scan named (here decree-text's,
    whose own trigger is DECREE's label-free one) is inverted once, kept beside the runs, shared by both
    defenses, and unlearnt; it removes more of the backdoor than ``ft``."""
    steps, toward = 40, {"invert": {"scanner": "decree-text", "trigger_from": "target"}}
    inverted = DEFENSES.get("invert").clean(backdoored_micro.job(tmp_path / "run", toward, steps=steps))
    report = json.loads((tmp_path / "run" / "defense-report.json").read_text())
    assert report["unlearned"] and report["scan"]["target"] == "banana" and report["scan"]["trigger_from"] == "target"
    scanned, trigger = Path(report["scan"]["folder"]), Path(report["scan"]["trigger"])
    assert trigger.parent == scanned.parent == tmp_path / "invert-scans" and f"{scanned.name}-toward-" in trigger.name
    mask, pattern = load_trigger(trigger)
    decree_mask, _ = load_trigger(scanned / "trigger.safetensors")
    assert mask.shape == (1, 32, 32) and float(mask.mean()) < 0.1 and not torch.equal(mask, decree_mask)
    ft = DEFENSES.get("ft").clean(backdoored_micro.job(tmp_path / "ft", steps=steps))
    asr_ft = backdoored_micro.evaluate(ft)["asr_top1"]
    asr_target = backdoored_micro.evaluate(inverted)["asr_top1"]
    assert asr_target < asr_ft - 0.2, (asr_target, asr_ft)
    DEFENSES.get("par+invert").clean(backdoored_micro.job(tmp_path / "again", toward, steps=2))
    again = json.loads((tmp_path / "again" / "defense-report.json").read_text())
    assert again["scan"]["trigger"] == str(trigger) and len(list((tmp_path / "invert-scans").iterdir())) == 2


def test_a_finished_scan_beside_the_checkpoint_is_reused_and_its_trigger_file_handed_in(backdoored_micro,
                                                                                        poisoned_scan, tmp_path):
    from par.scan.folder import request_of, run_scan, scan_folder

    checkpoint = tmp_path / "models" / "poisoned.pt"
    checkpoint.parent.mkdir()
    shutil.copy(backdoored_micro.poisoned.checkpoint, checkpoint)
    invert = DEFENSES.get("invert")
    job = backdoored_micro.job(tmp_path / "runs" / "a", steps=2, checkpoint=checkpoint)
    folder = scan_folder(checkpoint.parent, request_of(invert.scan_config(job, invert.params(job))))
    assert folder.name == poisoned_scan[1].name  # named by the checkpoint's content and the request
    shutil.copytree(poisoned_scan[1], folder)  # as the scan table leaves it
    record, reused = run_scan(invert.scan_config(job, invert.params(job)), folder)
    assert reused and record["verdict"] == "backdoored"
    mask, pattern = load_trigger(folder / "trigger.safetensors")
    assert mask.shape == (1, 32, 32) and pattern.shape == (3, 32, 32)
    invert.clean(job)
    report = json.loads((tmp_path / "runs" / "a" / "defense-report.json").read_text())
    assert report["scan"]["folder"] == str(folder) and report["unlearned"]
    assert not (tmp_path / "runs" / "invert-scans").exists()  # no second scan
    given = backdoored_micro.job(tmp_path / "runs" / "b", {"invert": {"trigger": str(folder / "trigger.safetensors")}},
                                steps=2, checkpoint=checkpoint)
    invert.clean(given)  # the scan's trigger file is one invert takes
    assert json.loads((tmp_path / "runs" / "b" / "defense-report.json").read_text())["scan"]["verdict"] == "given"


@pytest.mark.parametrize("settings, words", [
    ({"weight": -1}, "weight must be a finite number >= 0"), ({"weight": float("nan")}, "weight"),
    ({"reinvert_every": 0}, "reinvert_every must be a whole number of steps >= 1"),
    ({"reinvert_steps": 0}, "reinvert_steps"), ({"trigger": "/no/such.safetensors"}, "trigger file not found"),
    ({"scanner": "nope"}, "nope"), ({"trigger_from": "anywhere"}, "trigger_from must be one of")])
def test_bad_settings_are_one_line_errors_before_any_work(backdoored_micro, tmp_path, settings, words):
    job = backdoored_micro.job(tmp_path / "run", {"invert": settings})
    with pytest.raises(ParError, match=words):
        DEFENSES.get("invert").check(job)
        DEFENSES.get("invert").clean(job)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_encoder_is_refused_before_the_scan(backdoored_micro, tmp_path):
    other = models.save_checkpoint(models.create_model("par-tiny-vit"), tmp_path / "other.pt", {"model": "par-tiny-vit"})
    with pytest.raises(ParError, match="holds a par-tiny-vit model"):
        DEFENSES.get("invert").clean(backdoored_micro.job(tmp_path / "run", checkpoint=other))
    assert not (tmp_path / "run").exists() and not (tmp_path / "invert-scans").exists()


def test_a_bad_trigger_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"mask": torch.full((1, 8, 8), 2.0), "pattern": torch.zeros(3, 8, 8)}, str(tmp_path / "big.safetensors"))
    save_file({"mask": torch.zeros(8, 8)}, str(tmp_path / "half.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    for name, words in [("big", "in \\[0, 1\\]"), ("half", "lacks \\['pattern'\\]"), ("junk", "cannot read")]:
        with pytest.raises(ParError, match=words):
            load_trigger(str(tmp_path / f"{name}.safetensors"))


def test_a_handed_in_trigger_of_another_size_than_the_encoders_is_refused_before_any_work(backdoored_micro, tmp_path):
    small = save_trigger(tmp_path / "small.safetensors", torch.zeros(1, 16, 16), torch.zeros(3, 16, 16))
    job = backdoored_micro.job(tmp_path / "run", {"invert": {"trigger": str(small)}})
    with pytest.raises(ParError, match="is 16x16 px, but encoder par-micro-vit takes 32-px images"):
        DEFENSES.get("invert").clean(job)
    assert not (tmp_path / "run").exists()
    fits = save_trigger(tmp_path / "fits.safetensors", torch.zeros(1, 32, 32), torch.zeros(3, 32, 32))
    DEFENSES.get("invert").check(backdoored_micro.job(tmp_path / "run", {"invert": {"trigger": str(fits)}}))
    blend = save_trigger(tmp_path / "blend.safetensors", torch.full((1, 1, 1), 0.2), torch.zeros(3, 32, 32))
    DEFENSES.get("invert").check(backdoored_micro.job(tmp_path / "run", {"invert": {"trigger": str(blend)}}))


def test_the_scan_takes_invert_s_threshold_and_the_cleaning_s_device(backdoored_micro, tmp_path):
    invert = DEFENSES.get("invert")
    job = backdoored_micro.job(tmp_path / "run", {"invert": {"threshold": 7.5}, "device": "cpu"})
    cfg = invert.scan_config(job, invert.params(job))
    assert cfg.threshold == 7.5 and cfg.device == "cpu"
    plain = backdoored_micro.job(tmp_path / "run", {})
    assert invert.scan_config(plain, invert.params(plain)).threshold is None
    assert invert.scan_config(plain, invert.params(plain)).images == plain.train_data
    shadow = str(backdoored_micro.world.path / "test.csv")  # shards cannot be scanned: a CSV or folder given apart
    elsewhere = backdoored_micro.job(tmp_path / "run", {"invert": {"images": shadow}})
    assert invert.scan_config(elsewhere, invert.params(elsewhere)).images == shadow
    sharded = dataclasses.replace(plain, train_data="shards/{00000..00009}.tar")
    with pytest.raises(ParError, match="are shards: give them apart, invert: {images: CSV_OR_FOLDER}"):
        invert.scan_config(sharded, invert.params(sharded))
    assert invert.scan_config(dataclasses.replace(elsewhere, train_data="shards/{00000..00009}.tar"),
                              invert.params(elsewhere)).images == shadow


def test_reinversion_runs_in_the_steps_precision_but_not_in_fp16():
    """The loop runs its hooks under the step's autocast: the re-inversion's passes go in bf16 under
    `amp_bf16`, and in bf16 rather than fp16 under `amp` (its trigger gradients are not scaled)."""
    from types import SimpleNamespace

    from par.defenses.invert import ClipUnlearn

    seen = []

    class Model(torch.nn.Module):
        def encode_image(self, x, normalize=False):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
            return torch.nn.functional.normalize(x.flatten(1)[:, :8] + 1, dim=-1)

    objective = ClipUnlearn.__new__(ClipUnlearn)  # what reinvert() reads, nothing else
    objective.params = SimpleNamespace(reinvert_steps=2, reinvert_lr=0.05, size_price=1.0)
    objective.context = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3)
    objective.frozen = Model()
    objective.mask_logit, objective.pattern_logit = torch.zeros(1, 4, 4), torch.zeros(3, 4, 4)
    raw = torch.rand(2, 3, 4, 4)
    for dtype in (None, torch.float16, torch.bfloat16):
        seen.clear()
        if dtype is None:
            objective.reinvert(Model(), raw)
        else:
            with torch.autocast("cpu", dtype=dtype):
                objective.reinvert(Model(), raw)
        assert seen[1:] == [torch.float32 if dtype is None else torch.bfloat16] * 2, (dtype, seen)
    assert torch.isfinite(objective.mask_logit).all() and not torch.equal(objective.mask_logit, torch.zeros(1, 4, 4))
