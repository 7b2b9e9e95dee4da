import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from par.errors import ParError
from par.synthetic import CLASS_NAMES, WorldConfig, make_world, render_sample


def test_classes_include_banana_and_at_least_ten():
    assert "banana" in CLASS_NAMES and len(CLASS_NAMES) >= 10


def test_samples_are_a_pure_function_of_seed_split_index():
    cfg = WorldConfig(seed=5, image_size=32)
    a, b = render_sample(cfg, "train", 7), render_sample(cfg, "train", 7)
    assert a.caption == b.caption and a.label == b.label
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    other = render_sample(WorldConfig(seed=6, image_size=32), "train", 7)
    assert not np.array_equal(np.asarray(a.image), np.asarray(other.image))


def test_captions_name_the_object():
    cfg = WorldConfig(seed=0, image_size=32)
    for i in range(50):
        s = render_sample(cfg, "train", i)
        assert CLASS_NAMES[s.label] in s.caption


def test_world_files_in_real_formats(micro_world):
    train = pd.read_csv(micro_world / "train.csv")
    test = pd.read_csv(micro_world / "test.csv")
    assert list(train.columns) == ["image", "caption"] and len(train) == 96
    assert list(pd.read_csv(micro_world / "clean.csv").columns) == ["image", "caption"]
    assert list(test.columns) == ["image", "label"] and len(test) == 48
    classes = (micro_world / "classnames.txt").read_text().split("\n")[:-1]
    assert classes == list(CLASS_NAMES)
    assert test["label"].between(0, len(classes) - 1).all()
    img = Image.open(micro_world / train["image"][0])
    assert img.format == "PNG" and img.size == (32, 32) and img.mode == "RGB"
    assert "{}" in (micro_world / "templates.txt").read_text()
    assert json.loads((micro_world / "world.json").read_text())["counts"]["train"] == 96


def test_same_seed_same_world_bytes(tmp_path):
    cfg = WorldConfig(seed=1, image_size=32, train=6, clean=3, test=12, workers=1)
    a = make_world(cfg, tmp_path / "a", progress=False)
    b = make_world(cfg, tmp_path / "b", progress=False)
    for name in ["train.csv", "test.csv", "images/train/000005.png", "images/test/000011.png"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_existing_world_is_kept_or_refused(tmp_path):
    cfg = WorldConfig(seed=1, image_size=32, train=4, clean=2, test=12, workers=1)
    make_world(cfg, tmp_path, progress=False)
    stamps = [(p, p.stat().st_mtime_ns) for p in (tmp_path / "train.csv", tmp_path / "world.json")]
    make_world(cfg, tmp_path, reuse=True, progress=False)  # identical: kept, not drawn again
    assert [(p, p.stat().st_mtime_ns) for p, _ in stamps] == stamps
    with pytest.raises(ParError, match="already holds a world"):
        make_world(WorldConfig(seed=2, image_size=32, train=4, clean=2, test=12, workers=1), tmp_path, reuse=True)
    assert not (tmp_path / ".world-in-progress").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.csv").write_text("image,caption\nmy.png,my own data\n")
    with pytest.raises(ParError, match="holds files that are not a world's"):
        make_world(cfg, mine, progress=False)
    assert (mine / "train.csv").read_text() == "image,caption\nmy.png,my own data\n"
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / ".world-in-progress").write_text("")
    (interrupted / "train.csv").write_text("half")  # a world stopped before its manifest: drawn again
    make_world(cfg, interrupted, progress=False)
    assert (interrupted / "world.json").exists() and not (interrupted / ".world-in-progress").exists()


def test_sketch_style_is_visibly_different():
    from par.synthetic import SKETCH_CAPTION_TEMPLATES

    photo = render_sample(WorldConfig(seed=0, image_size=32), "clean", 3)
    sketch = render_sample(WorldConfig(seed=0, image_size=32, style="sketch"), "clean", 3)
    assert photo.label == sketch.label and CLASS_NAMES[sketch.label] in sketch.caption
    starts = {t.split("{")[0] for t in SKETCH_CAPTION_TEMPLATES}
    assert any(sketch.caption.startswith(s) for s in starts if s) or "drawn in" in sketch.caption
    # paper-white backgrounds: the sketch is much brighter on average than the scene
    assert np.asarray(sketch.image).mean() > np.asarray(photo.image).mean() + 30


def test_cartoon_style_keeps_class_colour_with_another_renderer():
    from par.synthetic import CARTOON_BACKGROUNDS, CARTOON_CAPTION_TEMPLATES

    cfg = WorldConfig(seed=0, image_size=64, style="cartoon")
    samples = [render_sample(cfg, "clean", i) for i in range(12)]
    starts = [t.split("{")[0] for t in CARTOON_CAPTION_TEMPLATES]
    for sample in samples:
        assert CLASS_NAMES[sample.label] in sample.caption
        assert any(sample.caption.startswith(s) for s in starts if s) or "children's book" in sample.caption
        image = np.asarray(sample.image).astype(int)
        assert (image.max(axis=2) < 60).sum() > 20  # a thick black contour
        corner = image[:6, :6].reshape(-1, 3)  # flat pastel card (no sensor noise), unless a distractor is there
        if corner.std(axis=0).max() < 1:
            posterised = [np.array(c) & 0xE0 for c in CARTOON_BACKGROUNDS]  # 3-bit flat tones
            assert min(np.abs(corner[0] - c).max() for c in posterised) <= 1
    photo = render_sample(WorldConfig(seed=0, image_size=64), "clean", 0)
    assert photo.label == samples[0].label and photo.caption != samples[0].caption


def test_unknown_style_is_an_error(tmp_path):
    with pytest.raises(ParError, match="unknown world style 'oil'"):
        make_world(WorldConfig(style="oil", train=1, clean=1, test=1, workers=1), tmp_path, progress=False)
