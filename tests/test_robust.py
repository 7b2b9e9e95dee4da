"""FARE and TeCoA (adversarial fine-tuning of the vision tower) and robust zero-shot accuracy (APGD)."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
from open_clip import ClipLoss

from conftest import REPO
from par import models
from par.augment import normalize
from par.app.cli import main
from par.data import labelled_dataset, load_classnames, to_float
from par.errors import ParError
from par.eval.zeroshot import EvalConfig, evaluate
from par.defenses.adversarial import ImageTower, fare_loss
from par.defenses.base import Batch, TaskContext, make_objective, objective_params
from par.eval.robust import eps_label, parse_eps, pgd
from par.train import train, train_config


def _images(world, n=16):
    data = labelled_dataset(world / "test.csv", load_classnames(world / "classnames.txt"), 32)
    images, labels = zip(*[data[i] for i in range(n)])
    return torch.stack(images), torch.stack(labels)


@pytest.fixture(scope="module")
def trained(micro_world, tmp_path_factory):
    """A micro CLIP trained long enough to beat chance, so that attacks have something to break."""
    out = tmp_path_factory.mktemp("trained")
    return train(train_config({"model": "par-micro-vit", "train_data": str(micro_world / "train.csv"), "out": str(out),
                               "objective": "clip", "steps": 120, "batch_size": 32, "warmup": 5, "lr": 2e-3,
                               "preload": True, "threads": 1, "progress": False, "log_every": 60}))


def _context(model):
    mean, std = models.image_mean_std(model)
    return TaskContext(ClipLoss(), models.get_tokenizer("par-micro-vit"), mean, std, seed=0)


def test_parse_eps_reads_fractions_and_rejects_the_rest():
    assert parse_eps("4/255") == pytest.approx(4 / 255) and parse_eps("0.5") == 0.5 and parse_eps(1) == 1.0
    for bad, why in (("abc", "number or a fraction"), ("1/0", "number or a fraction"), (True, "number or a fraction"),
                     ("0", "(0, 1]"), ("-1/255", "(0, 1]"), ("2", "(0, 1]")):
        with pytest.raises(ParError, match=__import__("re").escape(why)):
            parse_eps(bad)
    assert eps_label(4 / 255) == "4/255" and eps_label(0.0) == "0" and eps_label(0.01) == "0.01"


def test_pgd_raises_the_fare_loss_over_its_random_start_and_stays_in_the_ball(micro_world):
    torch.manual_seed(0)
    model = models.create_model("par-micro-vit").eval()
    frozen = copy.deepcopy(model)
    mean, std = models.image_mean_std(model)
    images = to_float(_images(micro_world)[0])
    with torch.no_grad():
        targets = frozen.encode_image(normalize(images, mean, std), normalize=False)
    loss = lambda x: fare_loss(model.encode_image(normalize(x, mean, std), normalize=False), targets)  # noqa: E731
    eps = 4 / 255
    start = pgd(loss, images, eps, 0, 1 / 255, True, torch.Generator().manual_seed(1))  # the random start alone
    attacked = pgd(loss, images, eps, 10, 1 / 255, True, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert loss(images).item() == 0.0  # the model is its frozen copy: no distance at the clean point
        assert loss(attacked).item() > 2 * loss(start).item() > 0
    assert (attacked - images).abs().max() <= eps + 1e-6 and attacked.min() >= 0 and attacked.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # the attack's gradients go to the perturbation only


def test_fare_gradient_reaches_only_the_vision_tower(micro_world):
    torch.manual_seed(0)
    model = models.create_model("par-micro-vit")
    objective = make_objective("fare", {"steps": 3}, model, _context(model))
    step_module = objective.step_module(model)
    assert isinstance(step_module, ImageTower)
    raw, _ = _images(micro_world, 8)
    batch = Batch(images=normalize(to_float(raw), *models.image_mean_std(model)),
                  tokens=torch.zeros(8, 77, dtype=torch.long), raw_images=raw, captions=["x"] * 8)
    terms = objective(step_module, batch)
    assert terms["loss"].item() > 0  # PGD moved the embeddings away from the (identical) frozen model's
    terms["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("visual."))
    assert all(not p.requires_grad and p.grad is None for p in objective.frozen.parameters())
    state = objective.state_dict()  # PGD's random starts resume exactly
    first = torch.rand(3, generator=objective.generator)
    objective.load_state_dict(state)
    assert torch.equal(torch.rand(3, generator=objective.generator), first)


def test_adversarial_objectives_refuse_what_they_cannot_do():
    assert objective_params("fare", {"eps": "2/255"}).eps == pytest.approx(2 / 255)
    with pytest.raises(ParError, match="fare trains only the vision tower"):
        objective_params("fare", {"tower": "text"})
    with pytest.raises(ParError, match="does not train the temperature"):
        objective_params("fare", {"train_logit_scale": True})
    with pytest.raises(ParError, match="0 < eps <= 1"):
        objective_params("tecoa", {"eps": 0})


def test_fare_run_moves_only_the_vision_tower(micro_world, tmp_path):
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    values = {"model": "par-micro-vit", "train_data": str(micro_world / "clean.csv"), "out": str(tmp_path / "fare"),
              "init_checkpoint": str(init), "objective": "fare", "objective_params": {"steps": 2}, "steps": 2,
              "batch_size": 16, "warmup": 1, "lr": 1e-3, "threads": 1, "progress": False, "log_every": 1}
    before, after = models.load_checkpoint(init), models.load_checkpoint(train(train_config(values)))
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"visual"}


def _class_folders(world, out):
    """The micro world's test images as a class-folder tree (folder names = class names)."""
    names = load_classnames(world / "classnames.txt")
    for line in (world / "test.csv").read_text().splitlines()[1:]:
        image, label = line.split(",")
        (out / names[int(label)]).mkdir(parents=True, exist_ok=True)
        shutil.copy(world / image, out / names[int(label)] / os.path.basename(image))
    return out


def test_tecoa_trains_on_class_folders_and_refuses_unlabelled_pairs(micro_world, tmp_path):
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    folders = _class_folders(micro_world, tmp_path / "folders")
    values = {"model": "par-micro-vit", "train_data": str(folders), "out": str(tmp_path / "tecoa"),
              "init_checkpoint": str(init), "objective": "tecoa",
              "objective_params": {"steps": 2, "classnames": str(micro_world / "classnames.txt"),
                                   "templates": str(micro_world / "templates.txt")},
              "train_classnames": str(micro_world / "classnames.txt"), "steps": 2, "batch_size": 16, "warmup": 1,
              "lr": 1e-3, "threads": 1, "progress": False, "log_every": 1}
    checkpoint = train(train_config(values))
    before, after = models.load_checkpoint(init), models.load_checkpoint(checkpoint)
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"visual"}
    losses = [json.loads(line)["loss"] for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    # a cross-entropy over 12 classes of logits scale * cosine: at most 2 * scale + log(12)
    bound = 2 * models.create_model("par-micro-vit").logit_scale.exp().item() + math.log(12)
    assert len(losses) == 2 and all(0 < loss < bound for loss in losses)
    unlabelled = {**values, "train_data": str(micro_world / "clean.csv"), "out": str(tmp_path / "t2")}
    with pytest.raises(ParError, match="trains on class labels"):
        train(train_config(unlabelled))


def _robust(world, checkpoint, eps, **extra):
    records = evaluate(EvalConfig(checkpoint=str(checkpoint), model="par-micro-vit", data=str(world / "test.csv"),
                                  classnames=str(world / "classnames.txt"), templates=str(world / "templates.txt"),
                                  robust_eps=eps, robust_steps=5, progress=False, **extra))
    return {r["evaluation"]: r for r in records}


def test_robust_accuracy_at_eps_zero_is_clean_accuracy(micro_world, trained):
    records = _robust(micro_world, trained, [0.0])
    clean = records["classification/clean"]["metrics"]["clean_top1"]
    robust = records["classification/robust@0"]
    assert clean > 1 / 12  # better than chance, else this compares nothing
    assert robust["metrics"]["robust_top1@0"] == pytest.approx(clean)
    assert robust["metrics"]["robust_clean_top1@0"] == pytest.approx(clean)
    assert robust["num_images"] == 48 and robust["robust"] == {"eps": 0.0, "attacks": ["apgd-ce", "apgd-t"],
                                                               "steps": 5, "norm": "Linf"}


def test_robust_accuracy_does_not_grow_with_eps(micro_world, trained):
    eps = [0.0, 1 / 255, 4 / 255, 16 / 255, 64 / 255]
    records = _robust(micro_world, trained, eps, robust_max_images=24)
    accuracy = [records[f"classification/robust@{eps_label(e)}"]["metrics"][f"robust_top1@{eps_label(e)}"] for e in eps]
    assert all(a >= b for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] < accuracy[0]  # the attacks do break something
    after = records["classification/robust@4/255"]["metrics"]
    assert after["robust_after_apgd-t@4/255"] <= after["robust_after_apgd-ce@4/255"]  # a cascade only removes


def test_robust_accuracy_leaves_torchs_global_random_stream_as_it_was_and_refuses_apgd_t_below_4_classes():
    from par.eval.robust import ZeroShotLogits, robust_accuracy

    torch.manual_seed(0)
    model = models.create_model("par-micro-vit")
    logits_fn = ZeroShotLogits(model, torch.nn.functional.normalize(torch.randn(32, 5), dim=0), (0.5,) * 3, (0.25,) * 3)
    loader = [(torch.rand(6, 3, 32, 32), torch.arange(6) % 5)]
    state = torch.get_rng_state()
    robust_accuracy(logits_fn, loader, torch.device("cpu"), 4 / 255, steps=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # torchattacks reseeds the global stream inside
    three = ZeroShotLogits(model, logits_fn.classifier[:, :3], (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ParError, match="apgd-t needs at least 4 classes, the classifier has 3"):
        robust_accuracy(three, loader, torch.device("cpu"), 4 / 255, steps=2, progress=False)


def test_robust_accuracy_attacks_at_most_attack_batch_images_at_once(monkeypatch):
    from par.eval import robust
    from par.eval.robust import ZeroShotLogits, robust_accuracy

    torch.manual_seed(0)
    logits_fn = ZeroShotLogits(models.create_model("par-micro-vit"), torch.nn.functional.normalize(torch.randn(32, 5), dim=0),
                               (0.5,) * 3, (0.25,) * 3)
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        labels = logits_fn(images).argmax(dim=1)  # every image correct: all six are attacked
    sizes = []

    def unchanged(logits_fn, x, y, eps, steps, seed):
        sizes.append(len(x))
        return x

    monkeypatch.setattr(robust.ROBUST_ATTACKS, "get", lambda name: unchanged)
    result = robust_accuracy(logits_fn, [(images, labels)], torch.device("cpu"), 4 / 255, attacks=("apgd-ce",),
                             steps=1, progress=False, attack_batch=4)
    assert sizes == [4, 2] and result["robust"] == result["clean"] == 1.0
    robust_accuracy(logits_fn, [(images, labels)], torch.device("cpu"), 4 / 255, attacks=("apgd-ce",), steps=1,
                    progress=False)
    assert sizes[2:] == [6]  # by default the loader's batch whole

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(robust.ROBUST_ATTACKS, "get", lambda name: out_of_memory)
    with pytest.raises(ParError, match="out of device memory attacking 6 images at once: lower robust_batch_size"):
        robust_accuracy(logits_fn, [(images, labels)], torch.device("cpu"), 4 / 255, attacks=("apgd-ce",), steps=1,
                        progress=False)


def test_robust_evaluation_bad_input(capsys, micro_world, trained, tmp_path):
    import open_clip

    base = ["eval", "--checkpoint", str(trained), "--model", "par-micro-vit", "--data", str(micro_world / "test.csv"),
            "--classnames", str(micro_world / "classnames.txt")]
    for eps, why in (("abc", "must be a number or a fraction"), ("0", "must be in (0, 1]"), ("3/2", "must be in (0, 1]")):
        assert main(base + ["--robust-eps", eps]) == 2
        assert why in capsys.readouterr().err
    assert main(base + ["--robust-eps", "2/255", "--robust-attacks", "nope"]) == 2
    assert "unknown robust attack 'nope'; known: apgd-ce, apgd-t, pgd" in capsys.readouterr().err
    assert main(base + ["--robust-steps", "50", "--robust-attacks", "apgd-ce"]) == 2  # no eps: nothing would use them
    assert "--robust-attacks, --robust-steps set how robust accuracy is measured: give --robust-eps too" in \
        capsys.readouterr().err
    assert main(base + ["--robust-eps", "2/255", "--robust-batch-size", "0"]) == 2
    assert "robust_batch_size must be a whole number of at least 1, got 0" in capsys.readouterr().err
    config = json.loads((models.PACKAGE_MODEL_CONFIGS / "par-micro-vit.json").read_text())
    config["vision_cfg"] = {}  # open_clip skips configs without the key; an empty tower is what reaches us
    (tmp_path / "par-text-only.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ParError, match="has no vision tower config"):
        evaluate(EvalConfig(
            checkpoint=str(trained), model="par-text-only", data=str(micro_world / "test.csv"),
            classnames=str(micro_world / "classnames.txt"), robust_eps=[2 / 255], progress=False))


def test_fare_through_the_cli_then_robust_validation(micro_world, tmp_path, capsys):
    """The user's path: clean with FARE from the command line, then validate with robust accuracy (what
    trigger_validate.sh runs with ROBUST_EPS; its own shell run is in test_real_eval)."""
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    assert main(["clean", "--defense", "fare", "--config", f"{REPO}/configs/micro/fare.yaml", "--checkpoint", str(init),
                 "--model", "par-micro-vit", "--train-data", str(micro_world / "clean.csv"),
                 "--out", str(tmp_path / "fare")]) == 0
    checkpoint = tmp_path / "fare" / "checkpoint.pt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--model", "par-micro-vit", "--attack", "badnet_rs",
                 "--label", "banana", "--data", str(micro_world / "test.csv"),
                 "--classnames", str(micro_world / "classnames.txt"), "--templates", str(micro_world / "templates.txt"),
                 "--robust-eps", "2/255,4/255", "--robust-max-images", "8", "--robust-steps", "2",
                 "--out", str(tmp_path / "fare" / "results.jsonl")]) == 0
    assert "classification/robust@4/255" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "fare" / "results.jsonl").read_text().splitlines()]
    robust = [r for r in records if "robust" in r]
    assert [r["robust"]["eps"] for r in robust] == pytest.approx([2 / 255, 4 / 255])
    assert all(r["num_images"] == 8 and r["robust"]["steps"] == 2 for r in robust)


def test_the_training_attack_runs_in_bf16_where_the_step_autocasts_to_fp16():
    """Under `amp` (fp16 autocast) PGD's unscaled input gradients can underflow to 0, and their sign with them:
    the attack runs in bf16 there; in fp32 (and bf16) it runs as the step does."""
    from types import SimpleNamespace

    from par.defenses.adversarial import AdversarialObjective, AdversarialParams

    objective = AdversarialObjective.__new__(AdversarialObjective)  # what attack() reads, nothing else
    objective.context = SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3)
    objective.params, objective.generator = AdversarialParams(steps=1), torch.Generator().manual_seed(0)
    seen = []

    class Tower(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
            return x.flatten(1)

    images = torch.rand(2, 3, 4, 4)
    objective.attack(Tower(), images, lambda e: e.float().pow(2).sum())
    with torch.autocast("cpu", dtype=torch.float16):
        objective.attack(Tower(), images, lambda e: e.float().pow(2).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        objective.attack(Tower(), images, lambda e: e.float().pow(2).sum())
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
