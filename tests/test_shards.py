"""webdataset shards: writer/reader round trip, seeded epochs and resuming into one, training from
shards, and the bad inputs (a pattern that matches nothing, a sample without a caption)."""
import io
import json
import tarfile

import pandas as pd
import pytest
import torch

from conftest import REPO, cli_error
from par import models
from par.data import eval_transform, open_image
from par.errors import ParError
from par.shards import ShardLoader, ShardPairs, count_samples, expand, write_shards
from par.utils import path_digest

MICRO = "par-micro-vit"


@pytest.fixture(scope="module")
def shards(micro_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    written = write_shards(micro_world / "train.csv", out, shard_size=40, progress=False)
    return out, written


def _pattern(out, n):
    return str(out / f"{{00000..{n - 1:05d}}}.tar")


def _take(stream, n):
    return [item for _, item in zip(range(n), stream)]


def test_writer_layout_and_sizes(shards, micro_world):
    out, written = shards
    assert [p.name for p in written] == ["00000.tar", "00001.tar", "00002.tar"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 40, "00001.tar": 40, "00002.tar": 16}
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.jpg", "000000000.txt"]  # open_clip's jpg/txt members, one key per pair
    assert count_samples(expand(_pattern(out, 3))) == 96
    (out / "sizes.json").rename(out / "sizes.bak")  # without sizes.json: the set is incomplete, refused
    try:
        with pytest.raises(ParError, match="no sizes.json: an incomplete shard set"):
            expand(_pattern(out, 3))
        assert count_samples([out / f"{i:05d}.tar" for i in range(3)]) == 96  # still countable from the headers
    finally:
        (out / "sizes.bak").rename(out / "sizes.json")


def test_round_trip_returns_every_pair(shards, micro_world):
    out, _ = shards
    frame = pd.read_csv(micro_world / "train.csv")
    tokenizer = models.get_tokenizer(MICRO)
    stream = ShardPairs(_pattern(out, 3), tokenizer, 32, buffer=1)
    items = _take(iter(stream), 96)  # one pass, in shard order (buffer 1: no mixing across passes)
    assert sorted(c for _, _, c, _ in items) == sorted(frame["caption"])
    transform = eval_transform(32)
    originals = torch.stack([transform(open_image(micro_world / p)) for p in frame["image"]]).float()
    for image, tokens, caption, label in items[:8]:
        assert image.dtype == torch.uint8 and image.shape == originals.shape[1:]
        distance = (originals - image.float()).abs().mean(dim=(1, 2, 3))
        assert frame["caption"][int(distance.argmin())] == caption  # its own picture, through JPEG
        assert distance.min() < 8
        assert torch.equal(tokens, tokenizer([caption])[0])
        assert label == -1  # the CSV has no label column


def test_epochs_are_seeded_and_resuming_skips_into_one(shards):
    out, _ = shards
    tokenizer = models.get_tokenizer(MICRO)
    loader = ShardLoader(ShardPairs(_pattern(out, 3), tokenizer, 32, seed=5, buffer=50), 8, 8, workers=2)
    assert loader.batches_per_epoch == 12
    first = [captions for _, _, captions, _ in loader.epoch(0)]
    assert len(first) == 12 and all(len(c) == 8 for c in first)
    assert [c for _, _, c, _ in loader.epoch(0)] == first  # the same epoch reads the same stream
    assert [c for _, _, c, _ in loader.epoch(1)] != first  # a new epoch reshuffles
    assert [c for _, _, c, _ in loader.epoch(0, skip=5)] == first[5:]  # resuming picks up where it stopped
    _, _, _, labels = next(iter(loader.epoch(0)))
    assert labels is None
    with pytest.raises(ParError, match=r"3 shard\(s\) for this process but 4 loader workers.*at least 4 shards"):
        ShardLoader(ShardPairs(_pattern(out, 3), tokenizer, 32, seed=5, buffer=50), 8, 8, workers=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_reads_every_pair_once_whatever_the_shuffle_buffer(micro_world, tmp_path, workers):
    """The buffer empties at the end of each pass: it never serves the next pass's pairs in place of this
    one's (two shards of 48 pairs: one reader, or two workers holding as many pairs each)."""
    write_shards(micro_world / "train.csv", tmp_path, shard_size=48, progress=False)
    loader = ShardLoader(ShardPairs(_pattern(tmp_path, 2), models.get_tokenizer(MICRO), 32, seed=5, buffer=50), 8, 8,
                         workers=workers)
    pairs = [(caption, image.numpy().tobytes()) for images, _, captions, _ in loader.epoch(0)
             for image, caption in zip(images, captions)]
    assert len(pairs) == 96 and len(set(pairs)) == 96


def test_labels_travel_as_cls_members(micro_world, tmp_path):
    frame = pd.read_csv(micro_world / "train.csv")
    frame["label"] = range(len(frame))
    frame["image"] = [str(micro_world / p) for p in frame["image"]]
    frame.to_csv(tmp_path / "labelled.csv", index=False)
    write_shards(tmp_path / "labelled.csv", tmp_path / "s", shard_size=100, progress=False)
    stream = ShardPairs(str(tmp_path / "s" / "00000.tar"), models.get_tokenizer(MICRO), 32, buffer=1, needs_labels=True)
    caption_to_label = dict(zip(frame["caption"], frame["label"]))
    for _, _, caption, label in _take(iter(stream), 10):
        assert label == caption_to_label[caption]


def test_digest_of_a_pattern_follows_the_shards(shards, tmp_path):
    out, _ = shards
    assert path_digest(_pattern(out, 3)) == path_digest(_pattern(out, 3))
    assert path_digest(_pattern(out, 3)) != path_digest(_pattern(out, 2))


def test_bad_shard_inputs(shards, micro_world, tmp_path):
    out, _ = shards
    tokenizer = models.get_tokenizer(MICRO)
    with pytest.raises(ParError, match="matches no file"):
        ShardPairs(str(tmp_path / "none-{00000..00003}.tar"), tokenizer, 32)
    with pytest.raises(ParError, match="1 of 4 shards missing"):
        ShardPairs(_pattern(out, 4), tokenizer, 32)
    with pytest.raises(ParError, match="3 shard\\(s\\) for 4 processes"):
        ShardPairs(_pattern(out, 3), tokenizer, 32, rank=0, world_size=4)
    with pytest.raises(ParError, match="not empty"):
        write_shards(micro_world / "train.csv", out, progress=False)

    bad = tmp_path / "nocaption.tar"
    with tarfile.open(bad, "w") as tar:
        data = (out / "00000.tar").read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as src:
            member = src.getmember("000000000.jpg")
            tar.addfile(member, src.extractfile(member))
    (tmp_path / "sizes.json").write_text(json.dumps({"nocaption.tar": 1}))
    with pytest.raises(ParError, match="sample 000000000 has no caption"):
        next(iter(ShardPairs(str(bad), tokenizer, 32)))


def test_cli_writes_shards_and_trains_from_them(micro_world, tmp_path, capsys):
    from par.app.cli import main

    out = tmp_path / "shards"
    assert main(["shards", "--csv", str(micro_world / "train.csv"), "--out", str(out), "--shard-size", "50"]) == 0
    made = capsys.readouterr().out
    assert "2 shards" in made and "{00000..00001}.tar" in made
    torch.manual_seed(0)
    init = models.save_checkpoint(models.create_model(MICRO), tmp_path / "init.pt")
    args = ["train", "--config", f"{REPO}/configs/micro/par.yaml", "--model", MICRO,
            "--init_checkpoint", str(init), "--train_data", str(out / "{00000..00001}.tar"), "--out",
            str(tmp_path / "run"), "--batch_size", "8", "--steps", "14", "--warmup", "2", "--workers", "2",
            "--threads", "1", "--progress", "false"]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 14 and records[-1]["epoch"] == 1  # 96 pairs // 8 = 12 batches an epoch
    before, after = models.load_checkpoint(init), models.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    missing = args.copy()
    missing[missing.index("--train_data") + 1] = str(tmp_path / "nope-{00000..00009}.tar")
    missing[missing.index("--out") + 1] = str(tmp_path / "run2")
    error = cli_error(capsys, missing)
    assert error.startswith("error: shard pattern") and "matches no file" in error
    assert not (tmp_path / "run2").exists()
