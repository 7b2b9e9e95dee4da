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


@pytest.mark.parametrize("name,canonical", [("ViT-B/32", "ViT-B-32-quickgelu"), ("ViT-L/14@336px", "ViT-L-14-336"),
                                            ("RN50", "RN50"), ("ViT-B-32", "ViT-B-32")])
def test_openai_spellings_are_aliases(name, canonical):
    assert models.canonical_model_name(name) == canonical


def test_openais_encoders_compute_with_quickgelu_and_a_checkpoint_of_the_other_activation_is_refused(tmp_path):
    """OpenAI's CLIPs (and every weight open_clip knows for RN50 and ViT-L-14-336) use QuickGELU; open_clip's
    plain ViT-B-32 is the GELU config of LAION's weights. The weights' shapes are the same, so a checkpoint
    saved as one loads into the other without a key mismatch: its saved encoder name is checked."""
    def activation(name):
        model = models.create_model(name, initialise=False)
        return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}

    assert activation("RN50") == activation("ViT-B/32") == activation("ViT-L/14@336px") == {"QuickGELU"}
    assert activation("ViT-B-32") == activation("par-micro-vit") == {"GELU"}
    gelu = models.save_checkpoint(models.create_model("ViT-B-32"), tmp_path / "gelu.pt")
    with pytest.raises(ParError, match="holds a ViT-B-32 model, not ViT-B-32-quickgelu \\(they differ in their "
                                       "activation, GELU and QuickGELU"):
        models.load_model("ViT-B/32", gelu)
    assert models.load_model("ViT-B-32", gelu).par_model_name == "ViT-B-32"
    assert models.same_encoder("ViT-L-14-336", "ViT-L-14-336-quickgelu")  # both QuickGELU: one model, two names
    assert not models.same_encoder("ViT-B-32", "ViT-B-32-quickgelu") and models.same_encoder("ViT-B/32", "ViT-B-32-quickgelu")
    bare = tmp_path / "bare.pt"  # no encoder named: the strict key check alone
    torch.save(torch.load(gelu, weights_only=True)["state_dict"], bare)
    assert models.load_model("ViT-B/32", bare).par_model_name == "ViT-B-32-quickgelu"


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
    with pytest.raises(ParError, match="holds a par-tiny-vit model, not par-micro-vit$"):  # named in its metadata
        models.load_model(MICRO, path)
    torch.save(other.state_dict(), tmp_path / "bare.pt")  # named nowhere: the keys' shapes tell
    with pytest.raises(ParError, match="does not match encoder par-micro-vit"):
        models.load_model(MICRO, tmp_path / "bare.pt")


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


MICRO_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture
def user_configs(tmp_path, monkeypatch):
    """A folder named by $PAR_MODEL_CONFIGS, read afresh by the next model built; open_clip's registry and
    the mean/std found are put back as they were after the test."""
    import open_clip.factory

    folder = tmp_path / "encoders"
    folder.mkdir()
    monkeypatch.setenv("PAR_MODEL_CONFIGS", str(folder))
    monkeypatch.setattr(models, "_registered", False)
    monkeypatch.setattr(models, "_preprocess", {})
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    return folder


def test_a_users_encoder_normalises_with_the_mean_and_std_its_file_gives(user_configs):
    import json

    (user_configs / "user-plain.json").write_text(json.dumps(MICRO_CONFIG))
    (user_configs / "user-half.json").write_text(json.dumps(
        {**MICRO_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.5], "resize_mode": "shortest"}}))
    (user_configs / "user-hub.json").write_text(json.dumps(  # a hub's open_clip_config.json, renamed
        {"model_cfg": MICRO_CONFIG, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                                       "interpolation": "bicubic", "size": 32}}))
    (user_configs / "user-hub-plain.json").write_text(json.dumps({"model_cfg": MICRO_CONFIG}))  # no preprocess_cfg
    (user_configs / "user-null.json").write_text(json.dumps({**MICRO_CONFIG, "preprocess_cfg": None}))
    (user_configs / "user-rgb.json").write_text(json.dumps(
        {**MICRO_CONFIG, "preprocess_cfg": {"mode": "RGB", "size": 32, "mean": [0.5, 0.5, 0.5]}}))
    from open_clip.constants import OPENAI_DATASET_MEAN

    assert models.image_mean_std(models.create_model("user-plain"))[0] == tuple(OPENAI_DATASET_MEAN)
    for name in ("user-hub-plain", "user-null"):
        assert models.image_mean_std(models.create_model(name))[0] == tuple(OPENAI_DATASET_MEAN)
    assert models.image_mean_std(models.create_model("user-rgb"))[0] == (0.5,) * 3
    assert models.image_mean_std(models.create_model("user-half")) == ((0.5,) * 3, (0.25, 0.5, 0.5))
    assert models.image_mean_std(models.create_model("user-hub")) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize("content,message", [
    ({"embed_dim": 32}, "an open_clip model config needs the keys embed_dim, vision_cfg, text_cfg"),
    ([1, 2], "must be a JSON object"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"resize_mode": "squash"}}, "resize_mode 'squash' is not what par does"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"interpolation": "bilinear"}}, "interpolation 'bilinear' is not what par"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"std": [0.5, 0.0, 0.5]}}, r"std must be 3 finite numbers .*each > 0"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"mean": [0.5, 0.5]}}, "mean must be 3 finite numbers"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"size": 224}}, "size 224 differs from the vision tower's image_size 32"),
    ({**MICRO_CONFIG, "preprocess_cfg": {"crop": 0.9}}, r"unknown 'preprocess_cfg' key\(s\) \['crop'\]"),
])
def test_a_users_encoder_config_that_par_cannot_follow_is_refused_naming_the_file(user_configs, content, message):
    import json

    (user_configs / "user-bad.json").write_text(json.dumps(content))
    with pytest.raises(ParError, match=f"encoder config .*user-bad.json: (preprocess_cfg )?{message}"):
        models.create_model("par-micro-vit")  # any encoder: the folder is read, and checked, before any is built
    (user_configs / "user-bad.json").write_text("{not json")
    with pytest.raises(ParError, match="user-bad.json: not readable JSON"):
        models.canonical_model_name("par-micro-vit")


def test_a_built_in_encoder_is_normalised_as_open_clips_weights_for_it_are_prepared():
    assert models.preprocess_of("RN50")["mean"] == (0.48145466, 0.4578275, 0.40821073)
    assert models.preprocess_of("ViT-L-14") is None  # weights prepared differently (0.5 or OpenAI's): OpenAI's
    assert models.preprocess_of("par-micro-vit") is None  # no weights known
    with pytest.raises(ParError, match="encoder ViT-B-16-SigLIP .*resize_mode 'squash' is not what par does"):
        models.create_model("ViT-B-16-SigLIP")  # refused before it is built


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated; what wrote OpenAI's files
def test_a_torchscript_archive_is_refused_as_code_not_called_corrupt(tmp_path):
    path = tmp_path / "ViT-B-32.pt"  # OpenAI's original downloads are TorchScript archives
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(ParError, match="is a TorchScript archive .*par never runs code from a checkpoint"):
        models.load_checkpoint(path)


def test_openais_state_dict_layout_loads_without_its_three_scalars(tmp_path, micro_model):
    path = tmp_path / "openai.pt"
    scalars = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(20), "vocab_size": torch.tensor(49408)}
    torch.save({**micro_model.state_dict(), **scalars}, path)
    _assert_same_weights(micro_model, models.load_model(MICRO, path).state_dict())
    torch.save({**micro_model.state_dict(), "input_resolution": torch.ones(2)}, path)  # not a scalar: not OpenAI's
    with pytest.raises(ParError, match="unexpected keys: input_resolution"):
        models.load_model(MICRO, path)
