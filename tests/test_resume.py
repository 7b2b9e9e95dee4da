"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO
from par import models


def _args(world, init, out, *extra):
    return [sys.executable, "-m", "par", "train", "--config", "configs/micro/par.yaml", "--model", "par-micro-vit",
            "--init_checkpoint", str(init), "--train_csv", str(world / "train.csv"), "--out", str(out),
            "--batch_size", "8", "--steps", "150", "--warmup", "2", "--save_every", "10", "--log_every", "1",
            "--threads", "1", *extra]


def test_resume_after_sigkill_matches_uninterrupted(micro_world, tmp_path):
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    subprocess.run(_args(micro_world, init, tmp_path / "full"), cwd=REPO, check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_args(micro_world, init, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "state-latest.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "checkpoint.pt").exists()
    saved_step = torch.load(state, weights_only=True)["step"]
    assert saved_step < 150

    resumed = subprocess.run(_args(micro_world, init, out, "--resume", "latest"), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {saved_step}" in resumed.stdout

    a = models.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = models.load_checkpoint(out / "checkpoint.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))  # no step logged twice, none missing


def test_resume_refuses_other_settings(micro_world, tmp_path):
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "init.pt")
    out = tmp_path / "run"
    args = _args(micro_world, init, out)
    args[args.index("--steps") + 1] = "12"
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    (out / "checkpoint.pt").unlink()  # pretend it was interrupted after its state at step 10
    proc = subprocess.run(args + ["--resume", "latest", "--lr", "0.5"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "differs in ['lr']" in proc.stderr
