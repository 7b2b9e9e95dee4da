"""The training loop's logging, live evaluation, plot and guards (single process, micro model)."""
import json

import pytest
import torch
from PIL import Image

from par import models
from par.config import build
from par.errors import ParError
from par.train import TrainConfig, train


def _cfg(world, out, **over):
    values = dict(model="par-micro-vit", train_csv=str(world / "train.csv"), out=str(out), steps=4, warmup=1,
                  batch_size=16, lr=1e-3, log_every=1, threads=1, progress=False)
    values.update(over)
    return build(TrainConfig, values)


def test_live_eval_logs_ca_and_asr_and_the_plot_is_written(micro_world, tmp_path):
    cfg = _cfg(micro_world, tmp_path / "run", eval_every=2, eval_csv=str(micro_world / "test.csv"),
               eval_classnames=str(micro_world / "classnames.txt"), eval_templates=str(micro_world / "templates.txt"),
               eval_attack="badnet_rs", eval_label="banana", eval_max_images=24)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [("ca" in r, "asr" in r) for r in records] == [(False, False), (True, True), (False, False), (True, True)]
    assert all(0 <= r["ca"] <= 1 and 0 <= r["asr"] <= 1 for r in records if "ca" in r)
    assert Image.open(tmp_path / "run" / "training.png").format == "PNG"


def test_gradient_accumulation_and_bf16_run(micro_world, tmp_path):
    train(_cfg(micro_world, tmp_path / "run", accum_steps=2, precision="amp_bf16"))
    assert models.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["logit_scale"].isfinite().all()


def test_non_finite_loss_stops_with_a_clear_message(micro_world, tmp_path):
    model = models.create_model("par-micro-vit")
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    ckpt = models.save_checkpoint(model, tmp_path / "nan.pt")
    with pytest.raises(ParError, match="loss became nan at step 0"):
        train(_cfg(micro_world, tmp_path / "run", init_checkpoint=str(ckpt)))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_too_few_rows_for_a_batch(micro_world, tmp_path):
    with pytest.raises(ParError, match="fewer than one batch of 512"):
        train(_cfg(micro_world, tmp_path / "run", batch_size=512))
