"""A run killed after a saved state and resumed with ``--resume latest`` ends bit for bit where an
uninterrupted run ends, for every defense in the registry: PAR's run is killed with SIGKILL in a process
of its own (no cleanup, no atexit), every other defense's is stopped in process at the same step by an
exception nothing in the library catches (the same saved state, without a second interpreter)."""
import json
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO
from par import models, train
from par.app.cli import main
from par.defenses import DEFENSES, FineTune
from par.defenses.invert import Invert
from par.scan.files import save_trigger

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


class Killed(BaseException):
    """Stops a run in process as SIGKILL would stop it: not an Exception, so no handler takes it."""


def stop_in_process(args, at: int, monkeypatch):
    """Runs ``python -m par ARGS`` in this process, stopped by ``Killed`` as (0-based) step ``at`` starts."""
    step = train.Step.__call__

    def killed(self, batch, index):
        if index == at:
            raise Killed
        return step(self, batch, index)

    with monkeypatch.context() as m:
        m.setattr(train.Step, "__call__", killed)
        with pytest.raises(Killed):
            main(args)


def every_defense():
    """Every registered defense: those that fine-tune on unlabelled pairs as they are, TeCoA on the same
    pairs with their class as a label, multi-stage ones (EftCLIP: detect, curate, fine-tune; invert: scan,
    fine-tune) killed in their fine-tuning stage."""
    return DEFENSES.in_order()


def _extra(defense, world, tmp_path):
    """What a defense needs beyond the shared options: labels (TeCoA), the poisoned data and label space
    (EftCLIP, whose micro oracle trains for one epoch), a trigger to unlearn (invert, par+invert)."""
    found = DEFENSES.get(defense)
    if found.needs_labels:
        names = (world / "classnames.txt").read_text().split("\n")
        frame = pd.read_csv(world / "train.csv")
        frame["image"] = [str(world / p) for p in frame["image"]]
        frame["label"] = [next(i for i, n in enumerate(names) if n and re.search(rf"\b{re.escape(n)}\b", c))
                          for c in frame["caption"]]  # every caption names its object's class
        labelled = tmp_path / "labelled.csv"
        frame.to_csv(labelled, index=False)
        return ["--train-data", str(labelled), "--objective_params.classnames", str(world / "classnames.txt")]
    if isinstance(found, Invert):  # a trigger handed in (no scan: nothing to find in a random model), re-inverted
        mask = torch.zeros(1, 32, 32)
        mask[:, 22:30, 22:30] = 1
        trigger = save_trigger(tmp_path / "trigger.safetensors", mask, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
        return ["--invert.trigger", str(trigger), "--invert.reinvert_every", "5"]
    if not isinstance(found, FineTune):
        return ["--poisoned-data", str(world / "train.csv"), "--classnames", str(world / "classnames.txt"),
                "--eftclip.oracle_params.epochs", "1", "--eftclip.oracle_params.precise_bn", "false",
                "--eftclip.object_list_size", "9"]
    return []


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    torch.manual_seed(0)
    return models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path_factory.mktemp("init") / "init.pt")


def _clean(defense, world, init, out, *extra):
    return ["clean", "--defense", defense, "--config", "configs/micro/par.yaml", "--model", "par-micro-vit",
            "--checkpoint", str(init), "--train-data", str(world / "train.csv"), "--out", str(out),
            "--steps", str(STEPS), "--batch_size", "8", "--warmup", "1", "--save_every", str(SAVE_EVERY),
            "--log_every", "1", "--threads", "1", "--tensorboard", "false", *FASTER.get(defense, []), *extra]


def _log(out):
    """Every logged value but the timings, per step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in records]


@pytest.mark.parametrize("defense", every_defense())
def test_killed_and_resumed_run_ends_bit_for_bit_as_an_unbroken_one(defense, micro_world, init, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = _extra(defense, micro_world, tmp_path)
    assert main(_clean(defense, micro_world, init, full, *extra)) == 0

    if defense == "par":
        kill_during(_clean(defense, micro_world, init, killed, *extra), at=KILL_AT)
    else:
        stop_in_process(_clean(defense, micro_world, init, killed, *extra), KILL_AT, monkeypatch)
    multi = not isinstance(DEFENSES.get(defense), FineTune)
    if multi:  # its stages keep their folders under the run's; the checkpoint is the fine-tuning stage's
        full, killed = full / "finetune", killed / "finetune"
    assert not (killed / "checkpoint.pt").exists()
    state = torch.load(killed / "state-latest.pt", weights_only=True)
    assert state["step"] == 14 and state["batches_done"] > 0  # mid-epoch
    if not multi:  # 96 rows of 8: 12 steps an epoch (EftCLIP's curated set is smaller)
        assert (state["epoch"], state["batches_done"]) == (1, 2)
    assert main(_clean(defense, micro_world, init, killed.parent if multi else killed, *extra,
                       "--resume", "latest")) == 0

    a, b = models.load_checkpoint(full / "checkpoint.pt"), models.load_checkpoint(killed / "checkpoint.pt")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, {differ[0]} by {(a[differ[0]] - b[differ[0]]).abs().max()}"
    assert [r["step"] for r in _log(killed)] == list(range(1, STEPS + 1))  # no step logged twice, none missing
    assert _log(killed) == _log(full)  # every loss term at every step
