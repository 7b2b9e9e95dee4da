"""The CUDA paths, run for real on a GPU: ``pytest -m cuda`` on a machine with one.

Skipped where there is no GPU, so CI stays green. ``PAR_CUDA_TESTS_DEVICE=cpu`` runs the same tests on
the CPU (fp16 autocast and the bf16-vs-fp32 comparison are then skipped) to check the tests themselves.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, stop_before_checkpoint
from par import models
from par.augment import AUGMENTATIONS
from par.data import to_float
from par.distributed import Dist
from par.defenses.base import Batch
from par.train import build_model, train, train_config
from par.utils import autocast

DEVICE = os.environ.get("PAR_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CAPTIONS = ["a photo of a banana on a table.", "a red cup next to a plate.", "two dogs in the park.",
            "a blue car on the street."]


def _precisions():
    return ["fp32", "amp", "amp_bf16"] if DEVICE == "cuda" else ["fp32", "amp_bf16"]


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory):
    """A 32-px world with 1,000 test images (CA differences of 0.5 points are 5 images)."""
    from par.synthetic import WorldConfig, make_world

    out = tmp_path_factory.mktemp("gpu-world")
    make_world(WorldConfig(seed=4, image_size=32, train=2000, clean=0, test=1000, workers=2), out, progress=False)
    return out


@pytest.mark.parametrize("encoder", ["ViT-B-32", "RN50"])
@pytest.mark.parametrize("objective", ["ft", "par", "cleanclip", "roclip"])
@pytest.mark.parametrize("precision", _precisions())
def test_one_step_trains_and_keeps_the_frozen_copy(encoder, objective, precision, tmp_path):
    """A few optimiser steps of a real open_clip encoder: finite losses, the weights move, the frozen copy does not."""
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    cfg = train_config({"model": encoder, "train_data": "unused.csv", "out": str(tmp_path), "objective": objective,
                        "precision": precision, "device": DEVICE, "batch_size": 4, "progress": False})
    model, wrapped, task, tokenizer = build_model(cfg, Dist(), device)
    size, mean, std = models.image_size(model), task.context.mean, task.context.std
    augment = AUGMENTATIONS.get("par" if objective == "par" else "none")
    raw = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, device=device)
    tokens = tokenizer(CAPTIONS).to(device)
    trained = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    frozen = None if task.frozen is None else {k: v.clone() for k, v in task.frozen.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp")
    task.on_epoch_start(1)  # RoCLIP: a matching epoch, so its caption pool (kept on the device) is used
    for _ in range(3):  # fp16's first steps may be skipped while the loss scale finds its level
        images = augment(to_float(raw), mean, std, generator=torch.Generator(device).manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            terms = task(wrapped, Batch(images, tokens, raw, list(CAPTIONS)))
        assert all(torch.isfinite(v).all() for v in terms.values()), terms
        scaler.scale(terms["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        task.after_step(model)
    moved = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, trained[k])]
    assert len(moved) > len(trained) // 2, f"only {len(moved)} of {len(trained)} trainable tensors changed"
    if frozen is not None:
        for k, v in task.frozen.state_dict().items():
            assert torch.equal(v, frozen[k]), f"frozen copy changed: {k}"


def test_par_augment_draws_on_the_device():
    """The loop's generator lives on the training device: the batch-sized noise is drawn there."""
    from par.defenses.par import par_augment

    device = torch.device(DEVICE)
    images = torch.rand(64, 3, 32, 32, device=device)
    a = par_augment(images, (0.5,) * 3, (0.25,) * 3, generator=torch.Generator(device).manual_seed(3))
    b = par_augment(images, (0.5,) * 3, (0.25,) * 3, generator=torch.Generator(device).manual_seed(3))
    assert a.device.type == device.type and torch.equal(a, b)
    plain = (images - 0.5) / 0.25
    noisy = ((a - plain).abs().flatten(1) > 0.01).float().mean(1) > 0.5  # noise touches every pixel
    assert 16 < int(noisy.sum()) < 48  # p = 0.5 per image


def _micro_run(world, out, **over):
    values = dict(model="par-micro-vit", train_data=str(world / "train.csv"), out=str(out), steps=12, warmup=2,
                  batch_size=32, lr=1e-3, log_every=1, device=DEVICE, progress=False)
    values.update(over)
    return train(train_config(values))


def test_compile_trains(gpu_world, tmp_path):
    checkpoint = _micro_run(gpu_world, tmp_path / "run", compile=True, precision="amp_bf16")
    state = models.load_checkpoint(checkpoint)
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0]


def test_resume_on_the_device_matches_an_unbroken_run(gpu_world, tmp_path, monkeypatch):
    from par import train as loop

    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    common = dict(objective="par", init_checkpoint=str(init), augment="par", save_every=10)
    _micro_run(gpu_world, tmp_path / "full", **common)
    with monkeypatch.context() as m:  # stopped after its state at step 10 was saved, before the checkpoint
        m.setattr(loop, "finish", stop_before_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            _micro_run(gpu_world, tmp_path / "cut", **common)
    assert (tmp_path / "cut" / "state-latest.pt").is_file() and not (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = train(train_config(dict(
        model="par-micro-vit", train_data=str(gpu_world / "train.csv"), out=str(tmp_path / "cut"), steps=12, warmup=2,
        batch_size=32, lr=1e-3, log_every=1, device=DEVICE, progress=False, **common)), resume="latest")
    # the resumed steps see the unbroken run's batches and draws: their losses agree to float noise (a wrong
    # batch or stream moves them by ~1e-2); CUDA's embedding backward adds in no fixed order (atomics), so
    # the weights are compared to that noise there, exactly on the CPU
    losses = {run: {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())}
              for run in ("full", "cut")}
    assert [losses["cut"][s] for s in (11, 12)] == pytest.approx([losses["full"][s] for s in (11, 12)], rel=1e-4)
    a, b = models.load_checkpoint(tmp_path / "full" / "checkpoint.pt"), models.load_checkpoint(resumed)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5 if DEVICE == "cpu" else 1e-3), k


@pytest.mark.skipif(DEVICE != "cuda", reason="compares the GPU's bf16 evaluation with the CPU's fp32")
def test_bf16_evaluation_agrees_with_fp32(gpu_world, tmp_path):
    from par.eval.zeroshot import EvalConfig, evaluate, merged_metrics

    checkpoint = _micro_run(gpu_world, tmp_path / "run", steps=300, warmup=20, batch_size=128, log_every=50)
    results = {}
    for device in ("cuda", "cpu"):  # evaluation runs bf16 autocast on CUDA, exact fp32 on the CPU
        results[device] = merged_metrics(evaluate(EvalConfig(
            checkpoint=str(checkpoint), model="par-micro-vit", data=str(gpu_world / "test.csv"),
            classnames=str(gpu_world / "classnames.txt"), templates=str(gpu_world / "templates.txt"),
            attack="badnet_rs", label="banana", device=device, progress=False)))
    # a model that has learnt something (chance is 1/12), so ties are rare: this recipe trained on the CPU
    # reaches CA 24.8 %, and its bf16 evaluation there (CPU autocast) differs from fp32 by one image in 1,000
    assert results["cpu"]["clean_top1"] > 0.2
    # the model was trained on the GPU here: allow ten images in 1,000 (a broken bf16 path is far off)
    assert abs(results["cuda"]["clean_top1"] - results["cpu"]["clean_top1"]) <= 0.01
    assert abs(results["cuda"]["asr_top1"] - results["cpu"]["asr_top1"]) <= 0.01


def test_scan_on_the_device_agrees_with_the_cpu(gpu_world, tmp_path):
    """A checkpoint scan on the device (its default precision: bf16 autocast on CUDA) and in exact fp32 on
    the CPU: the same verdict and label, every label's lift within bf16's noise."""
    from par.scan import ScanConfig, scan_checkpoint

    checkpoint = _micro_run(gpu_world, tmp_path / "run", steps=100, warmup=10, batch_size=64, log_every=50)
    results = {}
    for device in (DEVICE, "cpu"):
        results[device] = scan_checkpoint(ScanConfig(
            checkpoint=str(checkpoint), model="par-micro-vit", images=str(gpu_world / "test.csv"),
            classnames=str(gpu_world / "classnames.txt"), templates=str(gpu_world / "templates.txt"), max_images=64,
            device=device, progress=False))
    on_device, exact = results[DEVICE], results["cpu"]
    assert on_device.settings["precision_used"] == ("amp_bf16" if DEVICE == "cuda" else "fp32")
    assert exact.settings["precision_used"] == "fp32"
    assert on_device.verdict == exact.verdict
    # the same top label, or one the device scores within bf16's noise of its own top (near ties on a clean model)
    device_z = {}
    for r in on_device.labels:
        device_z[r["label"]] = max(device_z.get(r["label"], -math.inf), r["z"])
    assert max(device_z.values()) - device_z[exact.details["top_label"]] <= 0.5, (device_z, exact.details["top_label"])
    lifts = torch.tensor([[r["lift"] for r in result.labels] for result in (on_device, exact)])
    assert torch.corrcoef(lifts)[0, 1] > 0.99, lifts


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed beside this Python")
def test_torchrun_on_one_gpu(gpu_world, tmp_path):
    run = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "1", "-m", "par",
         "train", "--config", "configs/micro/par.yaml", "--model", "par-micro-vit", "--objective", "ft",
         "--train_data", str(gpu_world / "train.csv"), "--out", str(tmp_path / "run"), "--batch_size", "32",
         "--steps", "5", "--device", DEVICE, "--precision", "amp_bf16"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5
