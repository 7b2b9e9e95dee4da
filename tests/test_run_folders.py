"""Run folders trust only what their fingerprint records, and bad training values end before any work:
each refusal one ``error:`` line from the CLI (driven in process)."""
import json
import shutil

import pytest
import torch

from conftest import REPO, stop_before_checkpoint
from par import models
from par import train as loop
from par.app.cli import main


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs are named relative to it


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    return models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path_factory.mktemp("init") / "init.pt")


def _train(world, out, *extra):
    return ["train", "--config", "configs/micro/pretrain.yaml", "--train_data", str(world / "train.csv"),
            "--out", str(out), "--batch_size", "16", "--steps", "6", "--save_every", "4", "--tensorboard", "false",
            *extra]


def _clean(world, init, out, *extra):
    return ["clean", "--defense", "cleanclip", "--model", "par-micro-vit", "--checkpoint", str(init),
            "--train-data", str(world / "train.csv"), "--out", str(out), "--steps", "2", "--batch_size", "16",
            "--warmup", "1", "--threads", "1", "--progress", "false", "--tensorboard", "false", *extra]


def _error(capsys) -> str:
    """The one line a refusal printed."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def stopped_run(micro_world, tmp_path, monkeypatch):
    """A run stopped after its state of step 4 (of 6): a state, no checkpoint."""
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(loop, "finish", stop_before_checkpoint)
        assert main(_train(micro_world, out)) == 130
    assert (out / "state-latest.pt").exists() and not (out / "checkpoint.pt").exists()
    return out


def test_reuse_never_takes_a_checkpoint_its_folder_did_not_record(micro_world, init, tmp_path, capsys):
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(init, copied / "checkpoint.pt")  # the uncleaned file, no fingerprint.json
    assert main(_clean(micro_world, init, copied, "--reuse")) == 2
    assert "holds a checkpoint.pt no finished run wrote there" in _error(capsys)

    run = tmp_path / "run"
    assert main(_clean(micro_world, init, run)) == 0
    assert json.loads((run / "fingerprint.json").read_text())["finished"]["step"] == 2
    capsys.readouterr()
    assert main(_clean(micro_world, init, run, "--reuse")) == 0
    assert f"reusing {run / 'checkpoint.pt'} (same settings and inputs)" in capsys.readouterr().out
    shutil.copy(init, run / "checkpoint.pt")  # a finished run's checkpoint swapped for another file
    assert main(_clean(micro_world, init, run, "--reuse")) == 2
    assert "is not the checkpoint the run in" in _error(capsys)


def test_a_state_resumes_only_the_run_that_saved_it(micro_world, stopped_run, tmp_path, capsys):
    state = stopped_run / "state-latest.pt"
    other = tmp_path / "other"
    assert main(_train(micro_world, other, "--resume", str(state), "--lr", "0.5")) == 2
    assert "was saved by a run with other settings (differs in ['lr'])" in _error(capsys)
    assert not other.exists()  # refused before any folder is made
    assert main(_train(micro_world, stopped_run, "--resume", "latest", "--lr", "0.5")) == 2
    assert "made with other settings (differs in ['lr'])" in _error(capsys)

    # the same settings: continued in a new folder, which then records what it holds
    forked = tmp_path / "forked"
    assert main(_train(micro_world, forked, "--resume", str(state))) == 0
    assert json.loads((forked / "fingerprint.json").read_text())["finished"]["step"] == 6
    assert (forked / "config.yaml").exists()
    steps = [json.loads(line)["step"] for line in (forked / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the saved run's log up to its state, then this one's

    # a state saved without a fingerprint is trusted only in its own folder
    bare = torch.load(state, weights_only=True)
    del bare["fingerprint"]
    torch.save(bare, tmp_path / "bare.pt")
    assert main(_train(micro_world, tmp_path / "elsewhere", "--resume", str(tmp_path / "bare.pt"))) == 2
    assert "does not record which run saved it" in _error(capsys)


def test_a_truncated_state_is_one_line(micro_world, stopped_run, capsys):
    state = stopped_run / "state-latest.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    assert main(_train(micro_world, stopped_run, "--resume", "latest")) == 2
    assert "cannot read the state" in _error(capsys)
    state.write_bytes(b"")
    assert main(_train(micro_world, stopped_run, "--resume", "latest")) == 2
    assert "truncated" in _error(capsys)


BAD = [  # (option, value, what the error names)
    ("--steps", "0", "steps must be at least 1, got 0"),
    ("--batch_size", "0", "batch_size must be at least 1, got 0"),
    ("--accum_steps", "0", "accum_steps must be at least 1, got 0"),
    ("--workers", "-1", "workers must be at least 0, got -1"),
    ("--threads", "-2", "threads must be at least 0, got -2"),
    ("--lr", "nan", "lr must be a finite number > 0, got nan"),
    ("--lr", "0", "lr must be a finite number > 0, got 0.0"),
    ("--lr", "-1e-3", "lr must be a finite number > 0, got -0.001"),
    ("--lr", "inf", "lr must be a finite number > 0, got inf"),
    ("--weight_decay", "-0.1", "weight_decay must be a finite number >= 0, got -0.1"),
    ("--betas", "[0.9]", "betas must be a pair of numbers in [0, 1), got [0.9]"),
    ("--betas", "[0.9, 1.0]", "betas must be a pair of numbers in [0, 1), got [0.9, 1.0]"),
    ("--betas", "[-0.1, 0.9]", "betas must be a pair of numbers in [0, 1), got [-0.1, 0.9]"),
    ("--eps", "0", "eps must be a finite number > 0, got 0.0"),
    ("--warmup", "-1", "warmup must be at least 0, got -1"),
    ("--log_every", "0", "log_every must be at least 1, got 0"),
    ("--save_every", "-5", "save_every must be at least 0, got -5"),
    ("--eval_every", "-1", "eval_every must be at least 0, got -1"),
    ("--device", "gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("--device", "cuda:x", "device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
]
BAD_OBJECTIVE = [  # (objective, setting, value, what the error names)
    ("par", "tau", "0", "objective_params.tau must be a finite number > 0, got 0.0"),
    ("par", "tau", "nan", "objective_params.tau must be a finite number > 0, got nan"),
    ("par", "tau", "-2.15", "objective_params.tau must be a finite number > 0, got -2.15"),
    ("par", "train_logit_scale", "true", "par treats the temperature as a constant"),
    ("cleanclip", "unimodal_weight", "-1", "objective_params.unimodal_weight must be a finite number >= 0, got -1.0"),
    ("cleanclip", "unimodal_weight", "inf", "objective_params.unimodal_weight must be a finite number >= 0, got inf"),
    ("roclip", "pool_size", "0", "objective_params.pool_size must be at least 1, got 0"),
    ("roclip", "match_every", "0", "objective_params.match_every must be at least 1, got 0"),
]


@pytest.mark.parametrize("option,value,message", BAD)
def test_bad_training_values_are_one_line_before_any_folder(micro_world, tmp_path, capsys, option, value, message):
    out = tmp_path / "run"
    assert main(_train(micro_world, out, option, value)) == 2
    assert message in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("objective,key,value,message", BAD_OBJECTIVE)
def test_senseless_objective_settings_are_one_line_before_any_folder(micro_world, init, tmp_path, capsys, objective,
                                                                     key, value, message):
    out = tmp_path / "run"
    assert main(_train(micro_world, out, "--objective", objective, "--init_checkpoint", str(init),
                       f"--objective_params.{key}", value)) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_runs_started_within_one_second_get_their_own_folders(tmp_path, monkeypatch):
    from par import runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20260101-120000")
    first = runs.timestamped_folder(tmp_path, "cleaned-badnet")
    first.mkdir()
    second = runs.timestamped_folder(tmp_path, "cleaned-badnet")
    second.mkdir()
    assert first.name == "cleaned-badnet-20260101-120000"
    assert second.name == "cleaned-badnet-20260101-120000-2"
    assert runs.timestamped_folder(tmp_path, "cleaned-badnet").name.endswith("-3")


def test_a_run_whose_plot_failed_is_still_a_finished_run(micro_world, tmp_path, monkeypatch):
    """The checkpoint is recorded as finished before the training plot is drawn: a failure or an interrupt
    while drawing it leaves a run that --reuse takes, not a checkpoint no finished run recorded."""
    out = tmp_path / "plotted"

    def no_plot(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "plot_training", no_plot)
        with pytest.raises(KeyboardInterrupt):
            loop.train(loop.train_config(_values(micro_world, out)))
    assert loop.train(loop.train_config(_values(micro_world, out)), reuse=True) == out / "checkpoint.pt"


def _values(world, out):
    from par.config import load_yaml

    return {**load_yaml("configs/micro/pretrain.yaml"), "train_data": str(world / "train.csv"), "out": str(out),
            "batch_size": 16, "steps": 2, "tensorboard": False, "progress": False}
