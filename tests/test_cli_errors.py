"""Bad input ends in one 'error: ...' line and exit status 2, and loses nothing already written."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cli_error
from par import models
from par.app.cli import main


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "micro.pt"
    return models.save_checkpoint(models.create_model("par-micro-vit"), path)


def _eval_args(world, ckpt, **over):
    args = {"--checkpoint": str(ckpt), "--model": "par-micro-vit", "--data": str(world / "test.csv"),
            "--classnames": str(world / "classnames.txt"), "--templates": str(world / "templates.txt")}
    args.update(over)
    return ["eval"] + [x for kv in args.items() for x in kv]


def test_missing_csv_columns(capsys, micro_world, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.png,a banana\n")
    msg = cli_error(capsys, ["poison", "--csv", str(bad), "--attack", "badnet_rs", "--label", "banana",
                          "--out", str(tmp_path / "p"), "--num", "1"])
    assert "lacks column(s) ['image', 'caption']" in msg


def test_unknown_attack_lists_known(capsys, micro_world, tmp_path):
    msg = cli_error(capsys, ["poison", "--csv", str(micro_world / "train.csv"), "--attack", "nope", "--label", "banana",
                          "--out", str(tmp_path / "p"), "--num", "1"])
    assert "unknown attack 'nope'" in msg and "badnet_rs" in msg
    assert not (tmp_path / "p").exists()


def test_unknown_encoder(capsys, micro_world, micro_ckpt):
    msg = cli_error(capsys, _eval_args(micro_world, micro_ckpt, **{"--model": "ViT-Q-99"}))
    assert "unknown encoder 'ViT-Q-99'" in msg


def test_checkpoint_of_another_encoder(capsys, micro_world, micro_ckpt):
    msg = cli_error(capsys, _eval_args(micro_world, micro_ckpt, **{"--model": "par-tiny-vit"}))
    assert "holds a par-micro-vit model, not par-tiny-vit" in msg  # its metadata names its encoder


def test_label_not_a_class_keeps_previous_results(capsys, micro_world, micro_ckpt, tmp_path):
    out = tmp_path / "eval.json"
    out.write_text("previous results\n")
    msg = cli_error(capsys, _eval_args(micro_world, micro_ckpt, **{"--attack": "badnet_rs", "--label": "zebra",
                                                              "--out": str(out)}))
    assert "'zebra' is not a class" in msg
    assert out.read_text() == "previous results\n"


def test_a_target_label_naming_two_imagenet_classes_is_refused(capsys, micro_world, micro_ckpt, tmp_path):
    """open_clip's ImageNet list names ``missile`` twice: an ASR toward it would leave out one twin's images."""
    msg = cli_error(capsys, _eval_args(micro_world, micro_ckpt, **{"--classnames": "imagenet", "--attack": "badnet_rs",
                                                              "--label": "missile", "--out": str(tmp_path / "e.json")}))
    assert msg == ("error: target label 'missile' names 2 classes of imagenet (indices [657, 744]): an attack success "
                   "rate toward it would count one of them only; choose a label listed once")
    assert not (tmp_path / "e.json").exists()


def test_missing_and_corrupt_images(capsys, micro_world, micro_ckpt, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(micro_world, world)
    (world / "images" / "test" / "000003.png").write_bytes(b"not a png")
    msg = cli_error(capsys, _eval_args(world, micro_ckpt))
    assert "cannot decode image" in msg and "000003.png" in msg
    (world / "images" / "test" / "000003.png").unlink()
    msg = cli_error(capsys, _eval_args(world, micro_ckpt))
    assert "image not found" in msg and "000003.png" in msg


def test_corrupt_image_in_training_keeps_run_folder_unfinished(capsys, micro_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(micro_world, world)
    (world / "images" / "train" / "000001.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "run"
    msg = cli_error(capsys, ["train", "--config", "configs/micro/pretrain.yaml", "--train_data", str(world / "train.csv"),
                          "--out", str(out), "--workers", "1"])
    assert "cannot decode image" in msg and "000001.png" in msg
    assert not (out / "checkpoint.pt").exists()


def test_finished_run_is_never_overwritten(capsys, micro_world, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/micro/pretrain.yaml", "--train_data", str(micro_world / "train.csv"),
            "--out", str(out), "--steps", "2"]
    assert main(args) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert "already holds a finished run" in cli_error(capsys, args)
    assert "other settings" in cli_error(capsys, args + ["--reuse", "--lr", "0.5"])
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(args + ["--reuse"]) == 0


def test_unknown_config_key(capsys, micro_world, tmp_path):
    msg = cli_error(capsys, ["train", "--config", "configs/micro/pretrain.yaml", "--train_data",
                          str(micro_world / "train.csv"), "--out", str(tmp_path / "r"), "--learning_rate", "1"])
    assert "unknown train config key(s) ['learning_rate']" in msg


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "par", "poison", "--csv", str(tmp_path / "none.csv"), "--attack",
                           "badnet_rs", "--label", "banana", "--out", str(tmp_path / "o"), "--num", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: CSV not found: {tmp_path / 'none.csv'}"


def test_world_style_from_the_command_line(capsys, tmp_path):
    args = ["world", "--seed", "1", "--image-size", "32", "--train", "0", "--clean", "6", "--test", "0", "--workers", "1"]
    assert main(args + ["--out", str(tmp_path / "cartoon"), "--style", "cartoon"]) == 0
    assert "cartoon" in (tmp_path / "cartoon" / "world.json").read_text()
    msg = cli_error(capsys, args + ["--out", str(tmp_path / "oil"), "--style", "oil"])
    assert msg == "error: unknown world style 'oil'; known: photo, sketch, cartoon"


def test_bench_refuses_a_report_name_that_is_not_a_file_stem(capsys, tmp_path):
    msg = cli_error(capsys, ["bench", "--config", os.path.join(REPO, "configs", "micro-bench.yaml"), "--out",
                             str(tmp_path / "b"), "--report", "../elsewhere"])
    assert "report must be a file stem" in msg and not (tmp_path / "b").exists()
