"""A run killed with SIGKILL after a saved state and resumed with ``--resume latest`` ends bit for bit
where an uninterrupted run ends, for every fine-tuning defense in the registry."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from par import models
from par.app.cli import main
from par.defenses import DEFENSES, FineTune

# 96 training rows / batch 8 = 12 steps an epoch: the state of step 14 is 2 batches into epoch 1 (RoCLIP's
# first matching epoch, against the caption pool of epoch 0), the kill comes 2 steps later
STEPS, SAVE_EVERY, KILL_AT = 20, 7, 16
FASTER = {"fare": ["--objective_params.steps", "1"]}  # one PGD step a training step is enough here

# runs the CLI and kills its own process with SIGKILL (no cleanup, no atexit) as step KILL_AT starts
KILLED = """
import os, signal, sys
from par import train
step = train.Step.__call__
def killed(self, batch, index):
    if index == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, index)
train.Step.__call__ = killed
from par.app.cli import main
sys.exit(main(sys.argv[2:]))
"""


def kill_during(args, at: int):
    """Runs ``python -m par ARGS`` in a process of its own, killed with SIGKILL as (0-based) step ``at`` starts."""
    proc = subprocess.run([sys.executable, "-c", KILLED, str(at), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def fine_tuning_defenses():
    """Every registered defense that fine-tunes with one objective on the micro world's unlabelled pairs."""
    params = []
    for name in DEFENSES.in_order():
        found = DEFENSES.get(name)
        if not isinstance(found, FineTune):
            # multi-stage (EftCLIP: detect -> curate -> fine-tune): its stages are separate runs, each a folder,
            # and its fine-tuning stage is the ft objective's loop, covered here as ft
            params.append(pytest.param(name, marks=pytest.mark.skip(reason="multi-stage: its training is ft's loop")))
        elif found.needs_labels:
            params.append(pytest.param(name, marks=pytest.mark.skip(reason="trains on class labels; none here")))
        else:
            params.append(name)
    return params


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    return models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path_factory.mktemp("init") / "init.pt")


def _clean(defense, world, init, out, *extra):
    return ["clean", "--defense", defense, "--config", "configs/micro/par.yaml", "--model", "par-micro-vit",
            "--checkpoint", str(init), "--train-csv", str(world / "train.csv"), "--out", str(out),
            "--steps", str(STEPS), "--batch_size", "8", "--warmup", "1", "--save_every", str(SAVE_EVERY),
            "--log_every", "1", "--threads", "1", "--tensorboard", "false", *FASTER.get(defense, []), *extra]


def _log(out):
    """Every logged value but the timings, per step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in records]


@pytest.mark.parametrize("defense", fine_tuning_defenses())
def test_killed_and_resumed_run_ends_bit_for_bit_as_an_unbroken_one(defense, micro_world, init, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(_clean(defense, micro_world, init, full)) == 0

    kill_during(_clean(defense, micro_world, init, killed), at=KILL_AT)
    assert not (killed / "checkpoint.pt").exists()
    state = torch.load(killed / "state-latest.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_done"]) == (14, 1, 2)  # mid-epoch
    assert main(_clean(defense, micro_world, init, killed, "--resume", "latest")) == 0

    a, b = models.load_checkpoint(full / "checkpoint.pt"), models.load_checkpoint(killed / "checkpoint.pt")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, {differ[0]} by {(a[differ[0]] - b[differ[0]]).abs().max()}"
    assert [r["step"] for r in _log(killed)] == list(range(1, STEPS + 1))  # no step logged twice, none missing
    assert _log(killed) == _log(full)  # every loss term at every step
