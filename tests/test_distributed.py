"""Real torch.distributed (gloo, 2 CPU processes through torchrun) against a single process.

One torchrun launch runs every multi-process command of this module in sequence (tests/torchrun_many.py);
the single-process references run in this process."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from par import models
from par.app.cli import main
from par.shards import write_shards

# FARE: only the image tower is wrapped and trains; PGD from a fixed start, as the ranks' random streams differ
# RoCLIP: matching from the first epoch (its pool, of every rank's captions, is matched from the second step on),
# without its random views
OBJECTIVES = {"par": [], "clip": [], "fare": ["--objective_params.random_start", "false", "--objective_params.steps", "2"],
              "roclip": ["--objective_params.augment", "false", "--objective_params.match_every", "1"]}


def _train_args(world, ckpt, out, *extra):
    return ["train", "--config", f"{REPO}/configs/micro/par.yaml", "--model", "par-micro-vit",
            "--init_checkpoint", str(ckpt), "--train_data", str(world / "train.csv"), "--out", str(out),
            "--augment", "none", "--batch_size", "16", "--steps", "4", "--warmup", "1", "--lr", "1e-3",
            "--threads", "1", "--save_every", "2", "--progress", "false", *extra]


@pytest.fixture(scope="module")
def launch(micro_world, tmp_path_factory):
    """(folder, {command: (exit status, its output)}) of one two-rank launch of every command below."""
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), root / "init.pt")
    write_shards(micro_world / "train.csv", root / "shards", shard_size=24, progress=False)  # 4 shards
    write_shards(micro_world / "train.csv", root / "one-shard", shard_size=1000, progress=False)  # a whole set of 1
    commands = {f"multi-{name}": _train_args(micro_world, init, root / f"multi-{name}", "--objective", name, *extra)
                for name, extra in OBJECTIVES.items()}
    shards = _train_args(micro_world, init, root / "multi-shards", "--workers", "1")
    shards[shards.index("--train_data") + 1] = str(root / "shards" / "{00000..00003}.tar")
    odd = _train_args(micro_world, init, root / "odd", "--batch_size", "15")
    too_few = _train_args(micro_world, init, root / "too-few")
    too_few[too_few.index("--train_data") + 1] = str(root / "one-shard" / "00000.tar")
    commands.update({"multi-shards": shards, "odd": odd, "too-few": too_few})
    (root / "argv.json").write_text(json.dumps(list(commands.values())))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           f"{REPO}/tests/torchrun_many.py", str(root / "argv.json")], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ends = [line.split()[2:] for line in proc.stdout.splitlines() if line.startswith("exit ")]
    assert len(ends) == len(commands) and all(len(set(e)) == 1 for e in ends), proc.stdout + proc.stderr
    return root, init, {name: int(e[0]) for name, e in zip(commands, ends)}, proc.stderr  # same on both ranks


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_two_gloo_ranks_match_one_process(micro_world, launch, objective):
    root, init_ckpt, codes, _ = launch
    single, multi = root / f"single-{objective}", root / f"multi-{objective}"
    assert codes[f"multi-{objective}"] == 0
    assert main(_train_args(micro_world, init_ckpt, single, "--objective", objective, *OBJECTIVES[objective])) == 0
    # the resumable state holds the random streams of both ranks
    assert len(torch.load(multi / "state-latest.pt", weights_only=True)["rng"]) == 2
    # (a) the replicas stayed identical: gradients were all-reduced
    assert json.loads((multi / "distributed.json").read_text()) == {"world_size": 2, "replica_drift": 0.0}
    # (b) same global batch, same losses and weights as one process
    assert _losses(single) == pytest.approx(_losses(multi), rel=1e-4, abs=1e-5)
    a = models.load_checkpoint(single / "checkpoint.pt")
    b = models.load_checkpoint(multi / "checkpoint.pt")
    init = models.load_checkpoint(init_ckpt)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training moved the weights
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.in_proj_bias"):
            # the key bias has a zero gradient in exact arithmetic (softmax ignores it), so
            # Adam turns float rounding into updates there: compare the query and value parts
            width = x.numel() // 3
            x, y = torch.cat([x[:width], x[2 * width:]]), torch.cat([y[:width], y[2 * width:]])
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-3), k


def test_world_size_must_divide_batch(launch):
    root, _, codes, stderr = launch
    assert codes["odd"] == 2 and "batch_size 15 is not divisible by world size 2" in stderr
    assert not (root / "odd").exists()


def test_two_gloo_ranks_train_from_shards(launch):
    root, _, codes, stderr = launch
    assert codes["multi-shards"] == 0
    assert json.loads((root / "multi-shards" / "distributed.json").read_text()) == {"world_size": 2,
                                                                                   "replica_drift": 0.0}
    assert len(_losses(root / "multi-shards")) == 4
    assert codes["too-few"] == 2 and "1 shard(s) for 2 processes" in stderr
