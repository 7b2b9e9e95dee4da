"""The training loop's logging, live evaluation, plot, guards and objective interface (single process, micro model)."""
import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from conftest import stop_before_checkpoint
from par import models
from par.errors import ParError
from par.eval.zeroshot import EvalConfig, evaluate, merged_metrics
from par.defenses.base import OBJECTIVES, ObjectiveParams
from par.defenses.clip import ClipObjective
from par import train as loop
from par.train import FiniteWatch, train, train_config


def _cfg(world, out, **over):
    values = dict(model="par-micro-vit", train_data=str(world / "train.csv"), out=str(out), steps=4, warmup=1,
                  batch_size=16, lr=1e-3, log_every=1, threads=1, progress=False)
    values.update(over)
    return train_config(values)


def test_live_eval_logs_ca_and_asr_and_the_plot_is_written(micro_world, tmp_path):
    cfg = _cfg(micro_world, tmp_path / "run", eval_every=2, eval_csv=str(micro_world / "test.csv"),
               eval_classnames=str(micro_world / "classnames.txt"), eval_templates=str(micro_world / "templates.txt"),
               eval_attack="badnet_rs", eval_label="banana", eval_max_images=24)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [("ca" in r, "asr" in r) for r in records] == [(False, False), (True, True), (False, False), (True, True)]
    assert Image.open(tmp_path / "run" / "training.png").format == "PNG"
    # the last live measurement is the final model's evaluation on the same 24 images, trigger draws included
    rows = (micro_world / "test.csv").read_text().splitlines()[:25]
    (tmp_path / "first24.csv").write_text("\n".join(rows) + "\n")
    final = merged_metrics(evaluate(EvalConfig(
        checkpoint=str(tmp_path / "run" / "checkpoint.pt"), model="par-micro-vit", data=str(tmp_path / "first24.csv"),
        image_root=str(micro_world), classnames=str(micro_world / "classnames.txt"),
        templates=str(micro_world / "templates.txt"), attack="badnet_rs", label="banana", progress=False)))
    assert (records[-1]["ca"], records[-1]["asr"]) == (final["clean_top1"], final["asr_top1"])


def test_a_runs_thread_count_is_its_own(micro_world, tmp_path, monkeypatch):
    """``threads`` holds during the run; the caller's count is restored after it, and after a failure."""
    during = []
    step = loop.Step.__call__
    monkeypatch.setattr(loop.Step, "__call__", lambda self, *a: during.append(torch.get_num_threads()) or step(self, *a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(_cfg(micro_world, tmp_path / "ok", threads=1, steps=2))
        assert during == [1, 1] and torch.get_num_threads() == 2
        with pytest.raises(ParError, match="fewer than one batch"):
            train(_cfg(micro_world, tmp_path / "bad", threads=1, batch_size=128))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_gradient_accumulation_and_bf16_run(micro_world, tmp_path, monkeypatch):
    """accum_steps 2: every step calls the objective on two halves of its batch, and logs their mean loss."""
    from par.defenses.clip import ClipObjective

    calls = []
    call = ClipObjective.__call__

    def recorded(self, model, batch):
        terms = call(self, model, batch)
        calls.append((batch.images.shape[0], float(terms["loss"].detach())))
        return terms

    monkeypatch.setattr(ClipObjective, "__call__", recorded)
    train(_cfg(micro_world, tmp_path / "run", accum_steps=2, precision="amp_bf16"))
    assert models.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["logit_scale"].isfinite().all()
    assert [size for size, _ in calls] == [8] * 8  # 4 steps of 16 rows, each as two micro-batches of 8
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    means = [(calls[2 * i][1] + calls[2 * i + 1][1]) / 2 for i in range(4)]
    assert logged == pytest.approx(means, rel=1e-5)


def test_non_finite_loss_stops_with_a_clear_message(micro_world, tmp_path):
    model = models.create_model("par-micro-vit")
    with torch.no_grad():
        model.visual.proj.fill_(1e38)  # finite weights (NaN ones are refused at load) whose features overflow
    ckpt = models.save_checkpoint(model, tmp_path / "huge.pt")
    with pytest.raises(ParError, match="loss became nan at step 1;"):  # numbered as metrics.jsonl numbers steps
        train(_cfg(micro_world, tmp_path / "run", init_checkpoint=str(ckpt)))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_finite_watch_reports_the_first_bad_step_when_checked(tmp_path):
    watch = FiniteWatch(torch.device("cpu"), lr=1e-3)
    watch.watch(torch.tensor(1.5), 0)
    watch.check(tmp_path / "state.pt")  # all finite so far: no error
    watch.watch(torch.tensor(float("nan")), 3)
    watch.watch(torch.tensor(float("inf")), 5)
    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(ParError, match=r"loss became nan at step 3; lower lr \(now 0.001\).*last good state is"):
        watch.check(tmp_path / "state.pt")


def test_finite_watch_refuses_non_finite_weights_under_a_finite_loss(tmp_path):
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    watch = FiniteWatch(torch.device("cpu"), lr=1e-3, parameters=weights)
    watch.watch(torch.tensor(1.5), 1)
    watch.check(tmp_path / "state.pt", at=1)  # finite loss, finite weights: no error
    with torch.no_grad():
        weights[1][0] = float("inf")  # what an overflowing backward pass leaves after the optimiser step
    with pytest.raises(ParError, match="weights became non-finite by step 2 under a finite loss"):
        watch.check(tmp_path / "state.pt", at=2)


def test_too_few_rows_for_a_batch(micro_world, tmp_path):
    with pytest.raises(ParError, match="fewer than one batch of 512"):
        train(_cfg(micro_world, tmp_path / "run", batch_size=512))


@dataclass
class WeightedParams(ObjectiveParams):
    weight: float = 1.0


EVENTS = []
HOOK_PRECISION = []  # the autocast each after_step ran under


class WeightedClip(ClipObjective):
    """A plugin-style objective: its own settings, hooks and resumable state; train.py knows none of it."""

    Params = WeightedParams

    def __init__(self, model, params, context):
        super().__init__(model, params, context)
        self.steps_done = 0

    def __call__(self, model, batch):
        loss = super().__call__(model, batch)["loss"]
        return {"loss": self.params.weight * loss, "unweighted_loss": loss}

    def after_step(self, model):
        super().after_step(model)
        self.steps_done += 1
        EVENTS.append(("step", self.steps_done))
        HOOK_PRECISION.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)

    def on_epoch_start(self, epoch):
        EVENTS.append(("epoch", epoch))

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        EVENTS.append(("loaded", state["steps_done"]))
        self.steps_done = state["steps_done"]


if "weighted_clip_test" not in OBJECTIVES:
    OBJECTIVES.add("weighted_clip_test", WeightedClip)


def test_an_objective_registered_elsewhere_trains_with_its_settings_hooks_and_resume_state(micro_world, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "run"
    cfg = _cfg(micro_world, out, objective="weighted_clip_test", objective_params={"weight": 0.5},
               batch_size=32, steps=6, save_every=4)  # 96 rows: 3 steps per epoch
    EVENTS.clear()
    train(cfg)
    assert EVENTS == [("epoch", 0), ("step", 1), ("step", 2), ("step", 3), ("epoch", 1), ("step", 4), ("step", 5),
                      ("step", 6)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(0.5 * r["unweighted_loss"]) for r in records)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert saved["objective"] == "weighted_clip_test" and saved["objective_params"] == {"weight": 0.5}
    full = models.load_checkpoint(out / "checkpoint.pt")

    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    with monkeypatch.context() as m:  # stopped after the state of step 4, before the checkpoint
        m.setattr(loop, "finish", stop_before_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train(cut)
    (state,) = (tmp_path / "cut").glob("state*.pt")
    trained = torch.load(state, weights_only=True)["elapsed_s"]
    EVENTS.clear()
    train(cut, resume="latest")
    assert EVENTS == [("loaded", 4), ("epoch", 1), ("step", 5), ("step", 6)]
    last = json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])
    assert trained > 0 and last["elapsed_s"] > trained  # the time before the resume is counted
    resumed = models.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(ParError, match=r"objective_params of 'weighted_clip_test'.*\['tau'\]"):
        train(_cfg(micro_world, tmp_path / "other", objective="weighted_clip_test", objective_params={"tau": 1.0}))


def test_the_hooks_after_a_step_run_in_the_steps_precision(micro_world, tmp_path):
    """A hook's forward passes (invert's re-inversion) go as the step's do: bf16 under amp_bf16, none in fp32."""
    for precision, expected in (("fp32", torch.float32), ("amp_bf16", torch.bfloat16)):
        HOOK_PRECISION.clear()
        train(_cfg(micro_world, tmp_path / precision, objective="weighted_clip_test", batch_size=32, steps=2,
                   precision=precision))
        assert HOOK_PRECISION == [expected, expected]


def test_keys_that_moved_into_objective_params_get_a_pointed_error(micro_world, tmp_path):
    with pytest.raises(ParError, match=r"\['tau'\] belong to the objective now; use tau -> objective_params.tau"):
        _cfg(micro_world, tmp_path, objective="par", tau=1.0)


def test_clean_options_reach_the_objective_when_the_settings_file_is_written_for_another(micro_world, tmp_path,
                                                                                          capsys):
    """A settings file written for ``par`` lends cleanclip its budget, not PAR's objective_params, while the
    objective_params given as options are cleanclip's own; for ``par`` itself both apply."""
    from conftest import REPO
    from par.app.cli import main

    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    saved = {}
    for defense, option in (("cleanclip", ["--objective_params.unimodal_weight", "0.25"]),
                            ("par", ["--objective_params.tau", "1.5"])):
        out = tmp_path / defense
        assert main(["clean", "--defense", defense, "--config", f"{REPO}/configs/micro/par.yaml", "--model",
                     "par-micro-vit", "--checkpoint", str(init), "--train-data", str(micro_world / "train.csv"),
                     "--out", str(out), "--steps", "2", "--batch_size", "8", "--tensorboard", "false", *option]) == 0
        saved[defense] = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
        said = capsys.readouterr().out
        assert ("written for objective 'par'" in said) == (defense != "par"), said
    assert saved["cleanclip"]["objective"] == "cleanclip"
    assert saved["cleanclip"]["objective_params"] == {"unimodal_weight": 0.25}
    assert saved["par"]["objective_params"] == {"train_logit_scale": False, "tau": 1.5}
