import argparse
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from par import models
from par.errors import ParError

MICRO = "par-micro-vit"


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    return models.create_model(MICRO)


def _assert_same_weights(model, state):
    expected = model.state_dict()
    assert expected.keys() == state.keys()
    for k in expected:
        assert torch.equal(expected[k], state[k]), k


@pytest.mark.parametrize("name,canonical", [("ViT-B/32", "ViT-B-32"), ("ViT-L/14@336px", "ViT-L-14-336"), ("RN50", "RN50")])
def test_openai_spellings_are_aliases(name, canonical):
    assert models.canonical_model_name(name) == canonical


def test_unknown_encoder_suggests_close_names():
    with pytest.raises(ParError, match="unknown encoder 'ViT-B-33'.*ViT-B-32"):
        models.canonical_model_name("ViT-B-33")


def test_repo_configs_are_registered():
    assert models.canonical_model_name("par-tiny-vit") == "par-tiny-vit"


def test_bare_state_dict(tmp_path, micro_model):
    path = tmp_path / "bare.pt"
    torch.save(micro_model.state_dict(), path)
    _assert_same_weights(micro_model, models.load_checkpoint(path))


def test_reference_layout_with_module_prefix_and_namespace(tmp_path, micro_model):
    path = tmp_path / "epoch_2.pt"
    state = {"module." + k: v for k, v in micro_model.state_dict().items()}
    optimizer = torch.optim.AdamW(micro_model.parameters()).state_dict()
    torch.save({"epoch": 2, "state_dict": state, "optimizer": optimizer, "args": argparse.Namespace(lr=1e-5)}, path)
    _assert_same_weights(micro_model, models.load_checkpoint(path))


def test_safetensors(tmp_path, micro_model):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in micro_model.state_dict().items()}, str(path))
    _assert_same_weights(micro_model, models.load_checkpoint(path))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_then_load_model_round_trip(tmp_path, micro_model, suffix):
    path = models.save_checkpoint(micro_model, tmp_path / f"ckpt{suffix}", {"step": 3})
    loaded = models.load_model(MICRO, path)
    _assert_same_weights(micro_model, loaded.state_dict())
    assert not (tmp_path / f"ckpt.tmp{suffix}").exists()


def test_a_model_built_for_loading_skips_only_its_own_random_init(tmp_path, micro_model):
    """``load_model`` builds without the random init (every weight is loaded next, strictly); models built
    afterwards are initialised as before: from one seed, the same weights."""
    torch.manual_seed(1)
    first = models.create_model(MICRO).state_dict()
    path = models.save_checkpoint(micro_model, tmp_path / "m.pt")
    _assert_same_weights(micro_model, models.load_model(MICRO, path).state_dict())
    with pytest.raises(ParError, match="checkpoint not found"):
        models.load_model(MICRO, tmp_path / "absent.pt")
    torch.manual_seed(1)
    again = models.create_model(MICRO).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], micro_model.state_dict()[k]) for k in first)


def test_key_mismatch_names_the_keys(tmp_path, micro_model):
    state = dict(micro_model.state_dict())
    state.pop("ln_final.weight")
    state["extra.head"] = torch.zeros(1)
    state["text_projection"] = torch.zeros(5, 5)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ParError) as err:
        models.load_model(MICRO, path)
    message = str(err.value)
    assert "missing keys: ln_final.weight" in message
    assert "unexpected keys: extra.head" in message
    assert "text_projection (5, 5)" in message


def test_checkpoint_of_another_encoder_is_an_error(tmp_path):
    other = models.create_model("par-tiny-vit")
    path = models.save_checkpoint(other, tmp_path / "tiny.pt")
    with pytest.raises(ParError, match="does not match encoder par-micro-vit"):
        models.load_model(MICRO, path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_not_executed(tmp_path, micro_model, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": micro_model.state_dict(), "payload": _Payload(marker)}
    if writer == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(ParError, match="is not a safe checkpoint") as refused:
        models.load_checkpoint(path)
    assert "weights_only" not in str(refused.value)  # no advice to unpickle an untrusted file
    assert not marker.exists()


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ParError, match="not found"):
        models.load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ParError, match="not a PyTorch checkpoint, or a truncated or corrupt one"):
        models.load_checkpoint(bad)  # broken, not unsafe: no "pickled Python objects" said of it
    bad_st = tmp_path / "corrupt.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(ParError, match="cannot read safetensors checkpoint .*corrupt.safetensors"):
        models.load_checkpoint(bad_st)
