"""Bad input, class by class: each ends in one 'error: ...' line (exit status 2) before any work and
before anything is written, or works correctly; nothing wrong is reported as right."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO, cli_error
from par import models
from par.app.cli import main
from par.errors import ParError
from par.eval.retrieval import RetrievalDataset

MICRO = "par-micro-vit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return models.save_checkpoint(models.create_model(MICRO), tmp_path_factory.mktemp("ckpt") / "micro.pt")


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _eval(world, checkpoint, *extra):
    return ["eval", "--checkpoint", str(checkpoint), "--model", MICRO, "--data", str(world / "test.csv"),
            "--classnames", str(world / "classnames.txt"), "--templates", str(world / "templates.txt"), *extra]


def _grey16(path, value=20000, size=32):
    """A real 16-bit greyscale PNG (PIL mode I;16) of one value, with a faint gradient."""
    array = np.full((size, size), value, dtype=np.uint16)
    array[:, : size // 2] -= 256  # half a step darker in 8 bits: not a flat image
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == "I;16"
    return array.astype(float).mean() / 257  # the 8-bit mean it must decode to


# --------------------------------------------------------------------------- 1. image modes


def test_16_bit_png_decodes_to_its_level_through_every_opener(micro_world, tmp_path, ckpt):
    from par.attacks.badclip import _load_patch
    from par.data import ImageCaptionDataset, LabelledImageDataset, open_image
    from par.eval.retrieval import RetrievalDataset
    from par.gallery import trigger_gallery
    from par.shards import ShardPairs, write_shards

    expected = _grey16(tmp_path / "grey.png")
    assert abs(np.asarray(open_image(tmp_path / "grey.png")).mean() - expected) < 0.6  # not 255: white
    pd.DataFrame({"image": ["grey.png"] * 4, "label": [0] * 4}).to_csv(tmp_path / "test.csv", index=False)
    pd.DataFrame({"image": ["grey.png"] * 4, "caption": ["a grey square."] * 4}).to_csv(tmp_path / "train.csv",
                                                                                     index=False)
    tokenizer = models.get_tokenizer(MICRO)
    means = {
        "eval": LabelledImageDataset(tmp_path / "test.csv", 2, 32)[0][0].float().mean(),
        "train": ImageCaptionDataset(tmp_path / "train.csv", tokenizer, 32)[0][0].float().mean(),
        "retrieval": RetrievalDataset(_write_json(tmp_path / "r.json", [{"image": "grey.png", "caption": "a square"}]),
                                      tmp_path, 32)[0][0].float().mean(),
        "badclip patch": _load_patch(str(tmp_path / "grey.png")).mean() * 255,
    }
    write_shards(tmp_path / "train.csv", tmp_path / "shards", progress=False)
    means["shards"] = next(iter(ShardPairs(str(tmp_path / "shards" / "00000.tar"), tokenizer, 32, buffer=1)))[0].float().mean()

    assert main(["poison", "--csv", str(tmp_path / "train.csv"), "--attack", "blended", "--attack-param", "alpha=0.01",
                 "--label", "banana", "--num", "4", "--out", str(tmp_path / "poisoned")]) == 0
    means["poison"] = np.asarray(Image.open(tmp_path / "poisoned" / "images" / "0000000.png")).mean()
    trigger_gallery(tmp_path / "grey.png", tmp_path / "gallery.png", size=32, names=["blended"])
    means["triggers"] = np.asarray(Image.open(tmp_path / "gallery.png"))[18:, :32].mean()  # the clean tile
    for opener, mean in means.items():
        assert abs(float(mean) - expected) < 3, (opener, float(mean), expected)  # JPEG and blending: a little off


def _write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def test_every_image_mode_decodes_as_shown(tmp_path):
    from par.data import open_image

    def decoded(img, name):
        img.save(tmp_path / name)
        return np.asarray(open_image(tmp_path / name)).reshape(-1, 3)[0].tolist()

    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 200, 30] + [0] * 765)
    assert decoded(palette, "p.png") == [10, 200, 30]
    assert decoded(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "c.jpg")[0] > 200  # cyan-free, magenta+yellow: red
    assert decoded(Image.new("LA", (2, 2), (100, 255)), "la.png") == [100, 100, 100]
    assert decoded(Image.new("RGBA", (2, 2), (0, 0, 0, 0)), "clear.png") == [255, 255, 255]  # transparent: on white
    assert decoded(Image.new("RGBA", (2, 2), (0, 0, 0, 255)), "black.png") == [0, 0, 0]
    assert decoded(Image.fromarray(np.full((2, 2), 65535, dtype=np.int32), "I"), "i.tif") == [255, 255, 255]
    assert decoded(Image.fromarray(np.full((2, 2), 257 * 40, dtype=np.int32), "I"), "i40.tif") == [40, 40, 40]
    assert decoded(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F"), "f.tif") == [128, 128, 128]
    with pytest.raises(ParError, match="NaN"):
        decoded(Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32), "F"), "nan.tif")


# --------------------------------------------------------------------------- 2. decompression bombs


def test_an_image_over_the_pixel_limit_is_named_with_the_way_out(capsys, micro_world, ckpt, tmp_path, monkeypatch):
    from par.data import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32x32 world image is over twice that
    msg = cli_error(capsys, _eval(micro_world, ckpt, "--out", str(tmp_path / "r.jsonl")))
    assert "images/test/000000.png" in msg and "decompression-bomb" in msg and "PAR_MAX_IMAGE_PIXELS=1024" in msg
    assert not (tmp_path / "r.jsonl").exists()
    monkeypatch.setenv("PAR_MAX_IMAGE_PIXELS", "0")  # the way out the message names
    assert open_image(micro_world / "images" / "test" / "000000.png").size == (32, 32)


# --------------------------------------------------------------------------- 3. checkpoints


class Payload:
    """Stands for any object a pickle could smuggle in beside the weights."""


def test_non_finite_or_unsafe_checkpoints_are_refused(capsys, micro_world, tmp_path):
    import collections

    model = models.create_model(MICRO)
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    nan = models.save_checkpoint(model, tmp_path / "nan.pt")
    msg = cli_error(capsys, _eval(micro_world, nan, "--out", str(tmp_path / "r.jsonl")))
    assert "non-finite" in msg and "visual.proj" in msg
    assert not (tmp_path / "r.jsonl").exists()

    torch.save({"state_dict": model.state_dict(), "extra": collections.OrderedDict(x=Payload())}, tmp_path / "evil.pt")
    msg = cli_error(capsys, _eval(micro_world, tmp_path / "evil.pt"))
    assert "not a safe checkpoint" in msg and "Payload" in msg and "weights_only" not in msg
    (tmp_path / "cut.pt").write_bytes(nan.read_bytes()[:5000])
    msg = cli_error(capsys, _eval(micro_world, tmp_path / "cut.pt"))
    assert "truncated or corrupt" in msg and "weights_only" not in msg


# --------------------------------------------------------------------------- 4. shard sets


def test_incomplete_or_broken_shard_sets_are_refused(capsys, micro_world, tmp_path):
    from par.shards import ShardPairs, write_shards

    tokenizer = models.get_tokenizer(MICRO)
    out = tmp_path / "shards"
    write_shards(micro_world / "train.csv", out, shard_size=40, progress=False)
    ShardPairs(str(out / "{00000..00002}.tar"), tokenizer, 32)  # complete: fine
    with pytest.raises(ParError, match="names 1 of the 3 shards"):
        ShardPairs(str(out / "00000.tar"), tokenizer, 32)
    (out / "sizes.json").unlink()  # what an interrupted run leaves: tars, no index
    with pytest.raises(ParError, match="no sizes.json: an incomplete shard set"):
        ShardPairs(str(out / "{00000..00002}.tar"), tokenizer, 32)
    msg = cli_error(capsys, ["train", "--config", "configs/micro/pretrain.yaml", "--train_data", str(out / "00000.tar"),
                          "--out", str(tmp_path / "run")])
    assert "incomplete shard set" in msg and not (tmp_path / "run").exists()

    (tmp_path / "text.tar").write_text("not a tar at all\n" * 100)
    with pytest.raises(ParError, match="is not a tar file"):
        ShardPairs(str(tmp_path / "text.tar"), tokenizer, 32)

    # a shards run that meets a bad image leaves nothing behind, and never an index
    frame = pd.read_csv(micro_world / "train.csv")
    frame["image"] = [str(micro_world / p) for p in frame["image"]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    frame.loc[70, "image"] = str(tmp_path / "broken.png")
    frame.to_csv(tmp_path / "bad.csv", index=False)
    msg = cli_error(capsys, ["shards", "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "half"),
                          "--shard-size", "20"])
    assert "broken.png" in msg and not (tmp_path / "half").exists()


# --------------------------------------------------------------------------- 5. shell entry points


def _script_env(**extra):
    return {**os.environ, "PAR_PYTHON": sys.executable, **extra}


def test_trigger_validate_stops_on_a_broken_validate_config(micro_world, ckpt, tmp_path):
    (tmp_path / "bad.yaml").write_text(f"eval_data: {micro_world / 'test.csv'}\nattack_params: [unclosed\n")
    proc = subprocess.run(["bash", "trigger_validate.sh", str(ckpt), "badnet_rs", MICRO, "banana"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=_script_env(VALIDATE_CONFIG=str(tmp_path / "bad.yaml"), OUT_DIR=str(tmp_path / "out")))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: cannot parse config") and len(proc.stderr.strip().splitlines()) == 1
    assert "validating" not in proc.stdout and not (tmp_path / "out").exists()


def test_trigger_checks_attack_and_label_before_cleaning(micro_world, ckpt, tmp_path):
    env = _script_env(CHECKPOINT=str(ckpt), ENCODER=MICRO, TRAIN_DATA=str(micro_world / "clean.csv"),
                      OUT_DIR=str(tmp_path / "cleaned"), EVAL_CSV=str(micro_world / "test.csv"),
                      PAR_CONFIG="configs/micro/par.yaml", ATTACK="badnet_rs", LABEL="kiwi")
    proc = subprocess.run(["bash", "trigger.sh", "--steps", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: target label 'kiwi' is not a class in {micro_world / 'classnames.txt'}"
    assert not (tmp_path / "cleaned").exists()  # no cleaning ran


@pytest.mark.parametrize("env, args, words", [
    ({"ENCODER": MICRO}, [], "error: ENCODER given but no CHECKPOINT"),  # a misspelt CHECKPOINT: not the demo
    ({}, ["--steps", "2"], "error: arguments (--steps 2) given but no CHECKPOINT"),
    ({"CHECKPOINT": "x.pt", "ENCODER": MICRO, "TRAIN_DATA": "c.csv", "LABEL": "banana"}, [], "set ATTACK"),
    ({"CHECKPOINT": "x.pt", "ENCODER": MICRO, "TRAIN_DATA": "c.csv", "ATTACK": "badnet_rs"}, [], "set LABEL"),
    ({"CHECKPOINT": "x.pt", "ENCODER": MICRO, "TRAIN_DATA": "c.csv", "ATTACK": "badnet_rs", "LABEL": "banana"},
     ["--steps", "2", "--model=ViT-B-16"], "error: --model is set by this script")])
def test_trigger_refuses_settings_that_would_go_unused_or_be_guessed(tmp_path, env, args, words):
    environment = {k: v for k, v in _script_env(OUT_DIR=str(tmp_path / "out"), **env).items()
                   if k not in ("CHECKPOINT", "modelPath") or k in env}
    proc = subprocess.run(["bash", "trigger.sh", *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_trigger_validate_refuses_robust_settings_without_radii(micro_world, ckpt, tmp_path):
    proc = subprocess.run(["bash", "trigger_validate.sh", str(ckpt), "badnet_rs", MICRO, "banana"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=_script_env(EVAL_DATA=str(micro_world / "test.csv"), ROBUST_STEPS="10",
                                          OUT_DIR=str(tmp_path / "out")))
    assert proc.returncode == 2 and "ROBUST_STEPS is set but ROBUST_EPS is not" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_dry_run_checks_without_a_checkpoint(capsys, micro_world, tmp_path):
    assert main(_eval(micro_world, tmp_path / "later.pt", "--attack", "blended", "--label", "banana", "--dry-run")) == 0
    assert "check out" in capsys.readouterr().out
    msg = cli_error(capsys, _eval(micro_world, tmp_path / "later.pt", "--attack", "nope", "--label", "banana",
                               "--dry-run"))
    assert "unknown attack 'nope'" in msg
    assert _files(tmp_path) == []


# --------------------------------------------------------------------------- 6. unusable outputs


def test_unusable_outputs_are_refused_before_any_work(capsys, micro_world, ckpt, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me")
    csv, image = str(micro_world / "train.csv"), str(micro_world / "images" / "test" / "000000.png")
    before = _files(tmp_path)
    missing = str(tmp_path / "no-such.pt")  # the out is refused before the checkpoint is even looked at
    cases = [
        (_eval(micro_world, missing, "--out", str(tmp_path / "folder")), "is a folder"),
        (_eval(micro_world, missing, "--out", str(tmp_path / "file" / "r.jsonl")), "is a file, not a folder"),
        (["poison", "--csv", csv, "--attack", "badnet_rs", "--label", "banana", "--num", "2", "--out",
          str(tmp_path / "file")], "is a file, not a folder"),
        (["shards", "--csv", csv, "--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["detect", "--checkpoint", missing, "--model", MICRO, "--data", csv, "--classnames",
          str(micro_world / "classnames.txt"), "--out", str(tmp_path / "file")], "is a file, not a folder"),
        (["triggers", "--image", image, "--out", str(tmp_path / "folder")], "is a folder"),
        (["triggers", "--image", image, "--out", str(tmp_path / "t.png"), "--size", "0"], "at least 1"),
        (["world", "--out", str(tmp_path / "file"), "--train", "2", "--clean", "2", "--test", "2"], "not a folder"),
        (["train", "--config", f"{REPO}/configs/micro/pretrain.yaml", "--train_data", csv, "--out",
          str(tmp_path / "file")], "run folder"),
        (["clean", "--defense", "ft", "--checkpoint", str(ckpt), "--model", MICRO, "--train-data", csv, "--out",
          str(tmp_path / "file" / "run")], "is a file, not a folder"),
    ]
    for argv, why in cases:
        msg = cli_error(capsys, argv)
        assert why in msg, (argv[0], msg)
    assert _files(tmp_path) == before and (tmp_path / "file").read_text() == "keep me"


# --------------------------------------------------------------------------- 7. error lines, not tracebacks


@pytest.mark.parametrize("extra, why", [
    (["--batch-size", "0"], "batch_size must be a whole number of at least 1, got 0"),
    (["--batch-size", "-4"], "batch_size must be a whole number of at least 1, got -4"),
    (["--workers", "-1"], "workers must be a whole number of at least 0"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--attack", "badnet_rs", "--label", "banana", "--attack-param", "patch_size=-3"], "patch_size must be at least 1"),
    (["--attack", "blended", "--label", "banana", "--attack-param", "alpha=abc"], "alpha must be a number"),
    (["--attack", "blended", "--label", "banana", "--attack-param", "alpha=2"], "alpha must be in (0, 1]"),
    (["--attack", "warped", "--label", "banana", "--attack-param", "strength=.nan"], "strength must be a finite number"),
    (["--attack", "random", "--label", "banana", "--attack-param", "patch_size=[3"], "cannot read"),
    (["--attack", "badclip", "--label", "banana", "--attack-param", "patch=none.png"], "badclip patch not found"),
])
def test_bad_eval_options_are_error_lines(capsys, micro_world, ckpt, tmp_path, extra, why):
    msg = cli_error(capsys, _eval(micro_world, ckpt, "--out", str(tmp_path / "r.jsonl"), *extra))
    assert why in msg
    assert not (tmp_path / "r.jsonl").exists()


def test_a_tar_that_is_not_a_tar_is_an_error_line(capsys, tmp_path):
    (tmp_path / "data.tar").write_bytes(b"\x89PNG not a tar" * 100)
    msg = cli_error(capsys, ["train", "--config", "configs/micro/pretrain.yaml", "--train_data",
                          str(tmp_path / "data.tar"), "--out", str(tmp_path / "run")])
    assert "data.tar is not a tar file" in msg and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 8. nonsense values


def test_nonsense_values_are_refused(capsys, micro_world, ckpt, tmp_path):
    from par.data import ImageCaptionDataset

    msg = cli_error(capsys, ["poison", "--csv", str(micro_world / "train.csv"), "--attack", "badnet_rs", "--label",
                          "banana", "--num", "2", "--size", "0", "--out", str(tmp_path / "p")])
    assert "size must be a whole number of at least 1, got 0" in msg and not (tmp_path / "p").exists()
    msg = cli_error(capsys, ["world", "--out", str(tmp_path / "w"), "--train", "-5", "--clean", "2", "--test", "2"])
    assert "train must be a whole number of at least 0, got -5" in msg and not (tmp_path / "w").exists()

    labels = pd.read_csv(micro_world / "test.csv").head(4)
    labels["image"] = [str(micro_world / p) for p in labels["image"]]
    labels["label"] = ["0", "0.5", "1", "2"]
    labels.to_csv(tmp_path / "half.csv", index=False)
    msg = cli_error(capsys, _eval(micro_world, ckpt, "--data", str(tmp_path / "half.csv")))
    assert "line 3 holds '0.5'" in msg

    names = (micro_world / "classnames.txt").read_text().splitlines()
    (tmp_path / "dup.txt").write_text("\n".join(names + [names[0].upper()]) + "\n")
    msg = cli_error(capsys, _eval(micro_world, ckpt, "--classnames", str(tmp_path / "dup.txt"), "--attack", "blended",
                               "--label", names[0]))
    assert f"{names[0]!r} and {names[0].upper()!r}, one class to CLIP" in msg

    pairs = pd.read_csv(micro_world / "train.csv").head(4)
    pairs.loc[2, "caption"] = "  "
    pairs.to_csv(micro_world / "empty-caption.csv", index=False)
    try:
        with pytest.raises(ParError, match="line 4 has an empty caption"):
            ImageCaptionDataset(micro_world / "empty-caption.csv", models.get_tokenizer(MICRO), 32)
        msg = cli_error(capsys, ["poison", "--csv", str(micro_world / "empty-caption.csv"), "--attack", "badnet_rs",
                              "--label", "banana", "--num", "1", "--out", str(tmp_path / "p")])
        assert "empty caption" in msg and not (tmp_path / "p").exists()
        msg = cli_error(capsys, ["train", "--config", f"{REPO}/configs/micro/pretrain.yaml", "--train_data",
                                 str(micro_world / "empty-caption.csv"), "--out", str(tmp_path / "t")])
        assert "empty caption" in msg and not (tmp_path / "t").exists()  # refused before the run folder is made
    finally:
        (micro_world / "empty-caption.csv").unlink()


def test_other_bad_files_are_error_lines(capsys, micro_world, ckpt, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café\nbanana\n".encode("latin-1"))
    assert "is not UTF-8 text" in cli_error(capsys, _eval(micro_world, ckpt, "--classnames", str(tmp_path / "latin1.txt")))
    assert "is a folder, not a CSV file" in cli_error(capsys, ["poison", "--csv", str(tmp_path), "--attack", "blended",
                                                            "--label", "banana", "--num", "1", "--out",
                                                            str(tmp_path / "p")])
    (tmp_path / "latin1.json").write_bytes('[{"image": "caf\xe9.png", "caption": "a caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(ParError, match="cannot parse .*latin1.json"):
        RetrievalDataset(tmp_path / "latin1.json", tmp_path, 32)
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.001  # caf\xe9\n".encode("latin-1"))
    assert "cannot parse config" in cli_error(capsys, ["train", "--config", str(tmp_path / "latin1.yaml"),
                                                       "--train_data", str(micro_world / "train.csv"),
                                                       "--out", str(tmp_path / "t")])
    (tmp_path / "empty.csv").write_text("image,label\n")
    assert "has no rows" in cli_error(capsys, _eval(micro_world, ckpt, "--data", str(tmp_path / "empty.csv")))
    assert "is a folder, not a checkpoint file" in cli_error(capsys, _eval(micro_world, tmp_path))
    (tmp_path / "settings.yaml").write_text("eval_data:\n")
    msg = cli_error(capsys, ["shell-env", str(tmp_path / "settings.yaml"), "--keys", "EVAL_DATA"])
    assert "'eval_data' has no value" in msg
    (tmp_path / "lists.yaml").write_text("attack_params: [patch_size=4, fixed_pattern=true]\nrobust_eps: [2/255, 4/255]\n")
    assert main(["shell-env", str(tmp_path / "lists.yaml")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[ -n \"${ATTACK_PARAMS:-}\" ] || ATTACK_PARAMS='patch_size=4 fixed_pattern=true'",  # two parameters
        "[ -n \"${ROBUST_EPS:-}\" ] || ROBUST_EPS=2/255,4/255"]


def test_attack_parameters_whose_values_hold_spaces_reach_the_evaluation(micro_world, ckpt, tmp_path):
    """A mapping in VALIDATE_CONFIG with a value holding a space becomes one parameter a line, which
    trigger_validate.sh reads line by line (space-separated words would split "my mark" in two)."""
    (tmp_path / "text.yaml").write_text(f"eval_data: {micro_world / 'test.csv'}\n"
                                        "attack_params: {text: my mark, alpha: 0.5}\n")
    check = ["bash", "trigger_validate.sh", "--check", str(ckpt), "water_patt", MICRO, "banana"]
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_script_env(VALIDATE_CONFIG=str(tmp_path / "text.yaml"), OUT_DIR=str(tmp_path / "o")))
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=_script_env(EVAL_DATA=str(micro_world / "test.csv"), OUT_DIR=str(tmp_path / "o"),
                                          ATTACK_PARAMS="text=my mark\nalpha=2"))  # one a line, the second bad
    assert proc.returncode == 2 and "alpha" in proc.stderr and "my mark" not in proc.stderr, proc.stderr
