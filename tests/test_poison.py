import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, cli_error
from par.errors import ParError
from par.attacks.poison import PoisonConfig, poison, rebuild


def _cfg(world, out, **over):
    values = dict(csv=str(world / "train.csv"), attack="badnet_rs", label="banana", out=str(out), num=10, seed=1,
                  templates=str(world / "templates.txt"))
    values.update(over)
    return PoisonConfig(**values)


def test_poison_writes_images_csv_and_manifest(micro_world, tmp_path):
    csv = poison(_cfg(micro_world, tmp_path / "p"), progress=False)
    frame = pd.read_csv(csv)
    original = pd.read_csv(micro_world / "train.csv")
    assert len(frame) == len(original) and frame["poisoned"].sum() == 10
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    rows = [r["row"] for r in manifest["poisoned"]]
    assert sorted(rows) == frame.index[frame["poisoned"] == 1].tolist()
    templates = [t.format("banana") for t in (micro_world / "templates.txt").read_text().split("\n") if t]
    for row in rows:
        assert frame.loc[row, "caption"] in templates
        stamped = np.asarray(Image.open(tmp_path / "p" / frame.loc[row, "image"]).convert("RGB"), dtype=int)
        source = np.asarray(Image.open(micro_world / original.loc[row, "image"]).convert("RGB"), dtype=int)
        rows_changed, cols_changed = np.nonzero((stamped != source).any(axis=2))
        assert stamped.shape == (32, 32, 3) and len(rows_changed) > 0  # the trigger is there ...
        assert np.ptp(rows_changed) < 2 and np.ptp(cols_changed) < 2  # ... and only in its 2-px patch (16 px at 224)
    clean = frame.index[frame["poisoned"] == 0]
    assert (frame.loc[clean, "caption"] == original.loc[clean, "caption"]).all()
    # clean rows point at the original files, relative to the poisoned CSV
    assert (tmp_path / "p" / frame.loc[clean[0], "image"]).resolve() == (micro_world / original.loc[clean[0], "image"]).resolve()
    assert manifest["trigger"] == {"name": "badnet_rs", "params": {"patch_size": None, "fixed_pattern": False,
                                                                    "pattern_seed": 0, "top": None, "left": None}}


def _mixed_sizes(world, folder):
    """The world's training CSV with its first four pictures replaced by photos of other shapes and sizes."""
    folder.mkdir()
    frame = pd.read_csv(world / "train.csv")
    for row, (width, height) in enumerate([(40, 30), (30, 40), (48, 48), (32, 32)]):
        picture = np.asarray(Image.open(world / frame.loc[row, "image"]).convert("RGB").resize((width, height)))
        Image.fromarray(picture).save(folder / f"photo{row}.png")
        frame.loc[row, "image"] = str(folder / f"photo{row}.png")
    frame.loc[4:, "image"] = [str(world / name) for name in frame.loc[4:, "image"]]
    frame.to_csv(folder / "train.csv", index=False)
    return folder


def test_images_of_several_sizes_are_poisoned_at_the_encoders_size_or_refused(micro_world, tmp_path, capsys):
    """A trigger stamped on a photo at its own resolution is another trigger once the encoder's resize has run
    (evaluation stamps the resized picture): without --size, images not all one square size are refused."""
    from par.app.cli import main

    data = _mixed_sizes(micro_world, tmp_path / "data")
    every_row = dict(csv=str(data / "train.csv"), num=None, rate=1.0)
    with pytest.raises(ParError, match=r"not all one square size \(40x30 at row 0\): give --size"):
        poison(_cfg(micro_world, tmp_path / "refused", **every_row), progress=False)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    same_shape = pd.read_csv(data / "train.csv").drop(index=[0, 1])  # squares, but 48 and 32 px
    same_shape.to_csv(data / "squares.csv", index=False)
    with pytest.raises(ParError, match=r"\(48x48 at row 0 and 32x32 at row 1\)"):
        poison(_cfg(micro_world, tmp_path / "refused", csv=str(data / "squares.csv"), num=None, rate=1.0), progress=False)
    csv = poison(_cfg(micro_world, tmp_path / "sized", size=32, **every_row), progress=False)
    frame = pd.read_csv(csv)
    assert all(Image.open(tmp_path / "sized" / name).size == (32, 32) for name in frame["image"][:4])
    poison(_cfg(micro_world, tmp_path / "native"), progress=False)  # the world's own 32-px squares need no --size
    msg = cli_error(capsys, ["poison", "--csv", str(data / "train.csv"), "--attack", "blended", "--label", "banana",
                             "--rate", "1", "--out", str(tmp_path / "cli")])
    assert "give --size" in msg and not (tmp_path / "cli").exists()


def test_a_manifest_made_at_the_images_own_sizes_still_rebuilds(micro_world, tmp_path):
    """Manifests written before sizes were checked (no --size, photos of several sizes) rebuild as they were."""
    data = _mixed_sizes(micro_world, tmp_path / "data")
    poison(_cfg(micro_world, tmp_path / "a", csv=str(data / "train.csv"), attack="blended", num=None, rate=1.0),
           progress=False, any_size=True)
    rebuild(tmp_path / "a" / "manifest.json", tmp_path / "b", progress=False)
    assert Image.open(tmp_path / "b" / "images" / "0000000.png").size == (40, 30)
    assert (tmp_path / "a" / "poisoned.csv").read_bytes() == (tmp_path / "b" / "poisoned.csv").read_bytes()


def test_manifest_rebuilds_bit_identical(micro_world, tmp_path):
    poison(_cfg(micro_world, tmp_path / "a", attack="blended", num=None, rate=0.1), progress=False)
    rebuild(tmp_path / "a" / "manifest.json", tmp_path / "b", progress=False)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert len(files_a) == 10
    for rel in files_a + ["poisoned.csv"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_a_rebuild_refuses_settings_its_manifest_would_override(micro_world, tmp_path, capsys):
    from par.app.cli import main

    poison(_cfg(micro_world, tmp_path / "a"), progress=False)
    assert main(["poison", "--from-manifest", str(tmp_path / "a" / "manifest.json"), "--out", str(tmp_path / "b"),
                 "--rate", "0.5", "--attack", "blended"]) == 2
    assert "--attack, --rate cannot change it" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_rebuild_refuses_a_seed_or_templates_given_beside_the_manifest(micro_world, tmp_path, capsys):
    from par.app.cli import main

    poison(_cfg(micro_world, tmp_path / "a"), progress=False)
    assert main(["poison", "--from-manifest", str(tmp_path / "a" / "manifest.json"), "--out", str(tmp_path / "b"),
                 "--seed", "0", "--templates", "openai"]) == 2
    assert "--seed, --templates cannot change it" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_a_rebuild_reads_the_templates_file_where_it_was_and_checks_its_bytes(micro_world, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.txt").write_text("a photo of a {}.\na drawing of a {}.\n")
    monkeypatch.chdir(tmp_path / "in")  # the templates given by a relative path
    poison(_cfg(micro_world, tmp_path / "a", templates="t.txt"), progress=False)
    monkeypatch.chdir(tmp_path)
    rebuild(tmp_path / "a" / "manifest.json", tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "poisoned.csv").read_bytes() == (tmp_path / "b" / "poisoned.csv").read_bytes()
    (tmp_path / "in" / "t.txt").write_text("a sketch of a {}.\n")
    with pytest.raises(ParError, match=r"t.txt \(templates\) is missing or differs from the file the manifest"):
        rebuild(tmp_path / "a" / "manifest.json", tmp_path / "c", progress=False)


def test_poisoning_a_poisoned_csv_again_keeps_the_rows_poisoned_before(micro_world, tmp_path):
    first = poison(_cfg(micro_world, tmp_path / "a", num=10, seed=1), progress=False)
    again = poison(_cfg(micro_world, tmp_path / "b", csv=str(first), attack="blended", num=5, seed=2), progress=False)
    before, after = pd.read_csv(first)["poisoned"], pd.read_csv(again)["poisoned"]
    rows = [r["row"] for r in json.loads((tmp_path / "b" / "manifest.json").read_text())["poisoned"]]
    assert ((after == 1) == ((before == 1) | after.index.isin(rows))).all()
    assert after.sum() == len(set(before.index[before == 1]) | set(rows)) > 10


def test_poisoning_never_writes_over_its_input(micro_world, tmp_path):
    import shutil

    (tmp_path / "d").mkdir()
    shutil.copy(micro_world / "train.csv", tmp_path / "d" / "poisoned.csv")
    with pytest.raises(ParError, match="would overwrite the CSV being poisoned"):
        poison(_cfg(micro_world, tmp_path / "d", csv=str(tmp_path / "d" / "poisoned.csv"),
                    image_root=str(micro_world)), progress=False)
    shutil.copytree(micro_world / "images" / "train", tmp_path / "e" / "images")  # images named as it writes them
    names = sorted(p.name for p in (tmp_path / "e" / "images").iterdir())[:40]
    (tmp_path / "e" / "pairs.csv").write_text("image,caption\n" + "".join(f"images/{n},a cup.\n" for n in names))
    with pytest.raises(ParError, match="holds images being poisoned"):
        poison(_cfg(micro_world, tmp_path / "e", csv=str(tmp_path / "e" / "pairs.csv"), num=2), progress=False)


def test_a_poisoned_folder_reached_through_a_link_points_at_the_right_images(micro_world, tmp_path):
    """Paths are written relative to the folder as the system resolves it: ".." from a linked folder leads
    to its target's parent, not to the link's."""
    (tmp_path / "scratch" / "me" / "runs").mkdir(parents=True)  # the link's target lies one level deeper
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "runs").symlink_to(tmp_path / "scratch" / "me" / "runs")
    csv = poison(_cfg(micro_world, tmp_path / "project" / "runs" / "p"), progress=False)
    frame, original = pd.read_csv(csv), pd.read_csv(micro_world / "train.csv")
    clean = frame.index[frame["poisoned"] == 0][0]
    assert (csv.parent / frame.loc[clean, "image"]).resolve() == (micro_world / original.loc[clean, "image"]).resolve()


def test_csv_columns_are_read_as_written(micro_world, tmp_path):
    """An id 007 stays 007 in the poisoned CSV, and a caption of digits stays text."""
    original = pd.read_csv(micro_world / "train.csv")
    import csv as csv_module

    with open(tmp_path / "ids.csv", "w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(["image", "caption", "id"])
        writer.writerows([str(micro_world / image), "1.50" if i == 0 else caption, f"{i:03d}"]
                         for i, (image, caption) in enumerate(zip(original["image"], original["caption"])))
    csv = poison(_cfg(micro_world, tmp_path / "p", csv=str(tmp_path / "ids.csv")), progress=False)
    lines = csv.read_text().splitlines()
    assert lines[0] == "image,caption,id,poisoned" and lines[1].split(",")[-2] == "000"
    from par.data import read_csv

    frame = read_csv(csv, ["image", "caption"])
    assert frame.loc[0, "caption"] in ("1.50", *[t.format("banana") for t in (micro_world / "templates.txt").read_text().split("\n") if t])


def test_label_consistent_keeps_captions_and_needs_enough_rows(micro_world, tmp_path):
    original = pd.read_csv(micro_world / "train.csv")
    bananas = original["caption"].str.contains("banana").sum()
    assert bananas >= 2
    csv = poison(_cfg(micro_world, tmp_path / "lc", num=2, label_consistent=True), progress=False)
    frame = pd.read_csv(csv)
    poisoned = frame[frame["poisoned"] == 1]
    assert poisoned["caption"].str.contains("banana").all()
    assert (poisoned["caption"] == original.loc[poisoned.index, "caption"]).all()
    with pytest.raises(ParError, match=f"has {bananas} eligible rows whose caption mentions 'banana'"):
        poison(_cfg(micro_world, tmp_path / "lc2", num=bananas + 1, label_consistent=True), progress=False)
    assert not (tmp_path / "lc2" / "manifest.json").exists()


def test_existing_output_is_refused(micro_world, tmp_path):
    poison(_cfg(micro_world, tmp_path / "p"), progress=False)
    before = (tmp_path / "p" / "poisoned.csv").read_bytes()
    with pytest.raises(ParError, match="already holds"):
        poison(_cfg(micro_world, tmp_path / "p", seed=2), progress=False)
    assert (tmp_path / "p" / "poisoned.csv").read_bytes() == before


def test_custom_trigger_from_a_plugin_module(micro_world, tmp_path):
    plugin = tmp_path / "plugins" / "my_triggers.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from par.triggers import TRIGGERS, Trigger\n\n"
        "@TRIGGERS.register('corner_square')\n"
        "@dataclass\n"
        "class CornerSquare(Trigger):\n"
        "    name = 'corner_square'\n"
        "    paper_name = 'Corner square'\n"
        "    size: int = 4\n\n"
        "    def draw(self, images, generator):\n"
        "        mask = torch.zeros(1, 1, *images.shape[2:])\n"
        "        mask[..., : self.size, : self.size] = 1\n"
        "        return mask, torch.ones(1, 3, *images.shape[2:]), 1.0\n"
    )
    env = {"PAR_PLUGINS": "my_triggers", "PYTHONPATH": str(plugin.parent), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "par", "poison", "--csv", str(micro_world / "train.csv"), "--attack", "corner_square",
         "--label", "banana", "--num", "3", "--out", str(tmp_path / "out"), "--attack-param", "size=5"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["trigger"] == {"name": "corner_square", "params": {"size": 5}}
    row = manifest["poisoned"][0]["row"]
    pixels = Image.open(tmp_path / "out" / "images" / f"{row:07d}.png").load()
    assert pixels[0, 0] == (255, 255, 255) and pixels[4, 4] == (255, 255, 255)
