"""Checkpoints of the field, in their exact layouts, built from randomly initialised real architectures."""
import argparse
import functools

import pytest
import torch
from safetensors.torch import save_file

from par import models


@functools.lru_cache(maxsize=1)  # the cases of one architecture run together; one model in memory at a time
def _state(name):
    torch.manual_seed(0)
    return models.create_model(name).state_dict()


@pytest.fixture
def arch(request):
    return request.param, _state(request.param)


def _par_authors(state, path):
    # PAR's reference code: DDP keys, epoch, optimizer and the argparse Namespace of its arguments
    torch.save({"epoch": 2, "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 3e-6, "params": [0, 1]}]},
                "args": argparse.Namespace(lr=3e-5, batch_size=512, model="RN50")}, path)


def _cleanclip(state, path):
    # CleanCLIP: OpenAI-CLIP key names (shared by open_clip's CLIP), DDP prefix, epoch/name/optimizer
    torch.save({"epoch": 10, "name": "cleanclip", "state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, path)


def _open_clip(state, path):
    torch.save({"epoch": 32, "name": "open_clip", "state_dict": dict(state)}, path)


def _bare(state, path):
    torch.save(dict(state), path)


def _safetensors(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def _compiled(state, path):
    # a DDP-wrapped torch.compile'd model's state dict (module._orig_mod.), as other training code saves it
    torch.save({"state_dict": {"module._orig_mod." + k: v for k, v in state.items()}}, path)


FORMATS = [(_par_authors, "epoch_2.pt"), (_cleanclip, "epoch_10.pt"), (_open_clip, "epoch_32.pt"),
           (_bare, "model.bin"), (_safetensors, "open_clip_model.safetensors"), (_compiled, "compiled.pt")]


# every layout on the micro model (how a layout is unwrapped does not depend on the architecture); each real
# architecture's key namespace in one wrapped layout: RN50 in CleanCLIP's, ViT-B-32 in PAR's reference code's
CASES = [("par-micro-vit", *f) for f in FORMATS] + [("RN50", *FORMATS[1]), ("ViT-B-32", *FORMATS[0])]


@pytest.mark.parametrize("arch,writer,name", CASES, indirect=["arch"])
def test_loaded_weights_equal_saved(arch, tmp_path, writer, name):
    arch_name, state = arch
    path = tmp_path / name
    writer(state, path)
    loaded = models.load_model(arch_name, path).state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
