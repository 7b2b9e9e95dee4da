"""The training loop's parts, each on its own: parameter groups, the resumable sampler, run identity."""
import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from par import models
from par.data import ResumableSampler
from par.distributed import Dist
from par.errors import ParError
from par.runs import MetricsLog, RunFolder, fingerprint, save_state
from par.train import param_groups
from par.utils import file_digest


def test_param_groups_decay_only_matrices_of_trained_parameters():
    model = models.create_model("par-micro-vit")
    model.logit_scale.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    flat = {names[id(p)] for p in no_decay["params"]}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | flat == trained and not decayed & flat and "logit_scale" not in trained
    assert "visual.conv1.weight" in decayed and "text_projection" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert {"visual.ln_pre.weight", "visual.ln_pre.bias", "positional_embedding"} <= flat | decayed
    assert "visual.ln_pre.weight" in flat and "visual.ln_pre.bias" in flat


def test_resumable_sampler_skips_into_the_epoch_and_stays_a_permutation():
    data = list(range(10))
    full = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(order) == data and len(full) == 10
    resumed = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    resumed.set_epoch(2)
    resumed.skip = 4
    assert list(resumed) == order[4:] and len(resumed) == 6
    other_epoch = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != order  # reshuffled every epoch
    ranks = [ResumableSampler(data, num_replicas=2, rank=r, shuffle=True, seed=3) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    assert sorted(list(ranks[0]) + list(ranks[1])) == data  # the ranks split the epoch


@dataclass
class _Cfg:
    train_data: str
    out: str
    lr: float = 0.1
    init_checkpoint: Optional[str] = None
    progress: bool = True
    extra: dict = field(default_factory=dict)


def test_fingerprint_holds_settings_and_input_digests_not_cosmetics(tmp_path):
    csv = tmp_path / "a.csv"
    csv.write_text("image,caption\nx.png,a cat\n")
    fp = fingerprint(_Cfg(str(csv), "o1"), cosmetic=("out", "progress"), inputs=("train_data", "init_checkpoint"))
    assert fp == {"train_data": str(csv), "lr": 0.1, "init_checkpoint": None, "extra": {},
                  "train_data_digest": file_digest(csv)}
    assert fingerprint(_Cfg(str(csv), "o2", progress=False), ("out", "progress"), ("train_data",)) == \
        fingerprint(_Cfg(str(csv), "o1"), ("out", "progress"), ("train_data",))
    before = fp["train_data_digest"]
    csv.write_text("image,caption\nx.png,a dog\n")  # same path, other content: another run
    assert fingerprint(_Cfg(str(csv), "o1"), ("out",), ("train_data",))["train_data_digest"] != before


def _state(fp):
    return {"model": {}, "optimizer": {}, "scaler": {}, "step": 3, "epoch": 0, "batches_done": 3, "rng": [{}],
            "fingerprint": fp}


def test_run_folder_states(tmp_path):
    fp = {"lr": 0.1}
    run = RunFolder(tmp_path / "run", fp, Dist())
    assert run.status == "new" and not (tmp_path / "run").exists()  # nothing written before claim()
    run.claim()
    assert json.loads((tmp_path / "run" / "fingerprint.json").read_text()) == fp
    with pytest.raises(ParError, match="no state to resume from"):
        RunFolder(tmp_path / "run", fp, Dist(), resume="latest")
    save_state(run.state, _state(fp))
    with pytest.raises(ParError, match="holds an unfinished run"):
        RunFolder(tmp_path / "run", fp, Dist())
    assert RunFolder(tmp_path / "run", fp, Dist(), resume="latest").status == "resume"
    with pytest.raises(ParError, match=r"other settings \(differs in \['lr'\]\)"):
        RunFolder(tmp_path / "run", {"lr": 0.2}, Dist(), resume="latest")
    run.checkpoint.write_bytes(b"weights")
    with pytest.raises(ParError, match="holds a checkpoint.pt no finished run wrote there"):  # not recorded yet
        RunFolder(tmp_path / "run", fp, Dist(), reuse=True)
    run.mark_finished(step=3)
    assert RunFolder(tmp_path / "run", fp, Dist(), reuse=True).status == "finished"
    with pytest.raises(ParError, match="already holds a finished run"):
        RunFolder(tmp_path / "run", fp, Dist())
    with pytest.raises(ParError, match="already holds a finished run; nothing to resume"):
        RunFolder(tmp_path / "run", fp, Dist(), resume="latest")
    run.checkpoint.write_bytes(b"other weights")
    with pytest.raises(ParError, match="is not the checkpoint the run in .* finished with"):
        RunFolder(tmp_path / "run", fp, Dist(), reuse=True)


def test_metrics_log_keeps_earlier_steps_on_resume_and_closes_on_errors(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, enabled=True, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.write({"step": step, "loss": float(step)})
    with pytest.raises(RuntimeError):
        with MetricsLog(path, enabled=True, from_step=2, tensorboard=False) as log:
            log.write({"step": 3, "loss": 30.0})
            raise RuntimeError("training failed")
    assert log.file is None  # closed by the failure
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


def test_running_out_of_gpu_memory_in_a_step_names_the_settings_that_hold_the_batch(monkeypatch):
    import torch

    from par.train import Step

    step = Step.__new__(Step)  # only what the message reads: the failure is raised by the step's body
    step.accum_steps, step.precision = 2, "fp32"

    def out_of_memory(self, loader_batch, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Step, "_step", out_of_memory)
    with pytest.raises(ParError, match=r"out of GPU memory at 4 pairs per forward pass \(8 per process, accum_steps 2, "
                                       r"precision fp32\): raise accum_steps"):
        step((torch.zeros(8, 3, 4, 4), None, None, None), 0)


def test_random_streams_saved_on_another_kind_of_device_are_refused_by_name():
    import torch

    from par.runs import rng_state, set_rng_state

    class Stateless:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    generator = torch.Generator().manual_seed(3)
    state = rng_state({"augment": generator}, Stateless())
    expected = torch.rand(3, generator=generator)
    set_rng_state(state, {"augment": generator}, Stateless())  # the same kind of device: restored
    assert torch.equal(torch.rand(3, generator=generator), expected)
    from_gpu = {**state, "augment": torch.zeros(16, dtype=torch.uint8)}  # a CUDA generator's state is 16 bytes
    with pytest.raises(ParError, match="saved on another kind of device than cpu .*'augment' random stream"):
        set_rng_state(from_gpu, {"augment": generator}, Stateless())


def test_a_resumed_tensorboard_log_drops_the_killed_runs_later_events(tmp_path, monkeypatch):
    """SummaryWriter's purge_step, as metrics.jsonl keeps only the steps up to the resumed state's."""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            made.append(purge_step)

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    with MetricsLog(tmp_path / "metrics.jsonl", enabled=True, tensorboard=True):
        pass
    with MetricsLog(tmp_path / "metrics.jsonl", enabled=True, from_step=40, tensorboard=True):
        pass
    assert made == [None, 41]


def test_the_number_of_loader_workers_is_part_of_a_shard_runs_fingerprint():
    """Each worker reads every workers-th shard through its own shuffle: their number decides the batches."""
    from par.runs import fingerprint
    from par.train import INPUTS, TrainConfig, cosmetic_settings

    def fp(data, workers):
        cfg = TrainConfig(model="par-micro-vit", train_data=data, out="o", workers=workers)
        return {k: v for k, v in fingerprint(cfg, cosmetic_settings(cfg), ()).items()}

    assert fp("shards/{00000..00003}.tar", 1) != fp("shards/{00000..00003}.tar", 2)
    assert fp("pairs.csv", 1) == fp("pairs.csv", 2)  # a CSV's batches do not depend on it
