"""Image-caption pairs as webdataset shards, in open_clip's convention.

A shard is a tar of samples whose members share a key: ``KEY.jpg`` (the image), ``KEY.txt`` (the
caption) and, when the pairs are labelled, ``KEY.cls`` (the class index). A ``sizes.json`` beside
the shards maps each shard's file name to its sample count, as open_clip's ``--train-data`` expects;
it is written last, so a set without it (a run that failed or was interrupted) is refused, never
trained on in part. Training names the whole set with a brace pattern, ``shards/{00000..00099}.tar``.

At CC3M scale a CSV of image files means millions of small reads; shards turn them into a few large
sequential ones and need no index in memory. Reading is a stream: each epoch the rank's shards are
shuffled (seeded by the epoch), split among DataLoader workers, and mixed in a shuffle buffer. An
epoch is a nominal ``total // batch`` batches, as in open_clip: a rank whose shards run out starts
another pass over them, so every rank takes the same number of steps.
"""
from __future__ import annotations

import io
import itertools
import json
import numbers
import os
import random
from pathlib import Path
from typing import Iterator, List

import torch

from par.errors import ParError

SIZES = "sizes.json"


def is_shard_pattern(spec: str | os.PathLike) -> bool:
    """Whether a training-data spec names tar shards (``DIR/{00000..00009}.tar`` or one ``.tar``)."""
    return str(spec).endswith(".tar")


def read_index(folder: Path) -> dict:
    """``folder/sizes.json``: shard file name -> sample count. ``write_shards`` writes it last, so a
    folder without one holds an incomplete set (a run that failed or was interrupted)."""
    path = folder / SIZES
    if not path.is_file():
        raise ParError(f"{folder} has no {SIZES}: an incomplete shard set (python -m par shards writes that index "
                       "last, so a run that failed or was interrupted leaves none); write the shards again")
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ParError(f"cannot parse shard index {path}: {e}") from None
    if not isinstance(sizes, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in sizes.items()):
        raise ParError(f"shard index {path} must map each shard's file name to its (positive) sample count")
    return sizes


def check_tar(path: Path) -> None:
    """Refuses a file that is not a whole tar: a bad first header, or no end-of-archive marker (two
    zero blocks) at the end, as a copy or write cut short leaves. Reads 2 KiB, not the shard."""
    import tarfile

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(max(0, size - 1024))
        tail = f.read(1024)
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        raise ParError(f"shard {path} is an empty tar: it holds no samples") from None
    except tarfile.HeaderError:
        raise ParError(f"shard {path} is not a tar file (shards are uncompressed tars, as python -m par shards "
                       "writes them)") from None
    if size % 512 or size < 1536 or tail.strip(b"\0"):
        raise ParError(f"shard {path} is truncated (its end-of-archive marker is missing); write or copy it again")


def expand(pattern: str) -> List[Path]:
    """The shard files a brace pattern names. The set must be complete: every file there and a whole
    tar, and the ``sizes.json`` index beside them listing exactly the shards named (an index that
    lists more means the pattern leaves some out)."""
    import braceexpand

    names = [Path(p) for p in braceexpand.braceexpand(str(pattern))]
    missing = [p for p in names if not p.is_file()]
    if len(missing) == len(names):
        raise ParError(f"shard pattern {pattern} matches no file (e.g. {names[0]} does not exist)")
    if missing:
        raise ParError(f"shard pattern {pattern}: {len(missing)} of {len(names)} shards missing, e.g. {missing[0]}")
    for p in names:
        check_tar(p)
    for folder in sorted({p.parent for p in names}):
        listed = set(read_index(folder))
        named = {p.name for p in names if p.parent == folder}
        unlisted, left_out = sorted(named - listed), sorted(listed - named)
        if unlisted:
            raise ParError(f"{folder / SIZES} does not list {len(unlisted)} of the shards {pattern} names "
                           f"(e.g. {unlisted[0]}): not one complete shard set")
        if left_out:
            raise ParError(f"{pattern} names {len(named)} of the {len(listed)} shards {folder / SIZES} lists; the "
                           f"others (e.g. {left_out[0]}) are left out: name the whole set")
    return names


def count_samples(shards: List[Path]) -> int:
    """Samples in ``shards`` (``expand`` has checked the set): from the ``sizes.json`` beside them, else
    by reading the tar headers (exact, and fast: member data is skipped, not read)."""
    import tarfile

    total = 0
    sizes = {}
    for folder in {s.parent for s in shards}:
        if (folder / SIZES).is_file():
            sizes.update({str(folder / k): v for k, v in json.loads((folder / SIZES).read_text()).items()})
    for shard in shards:
        if str(shard) in sizes:
            total += int(sizes[str(shard)])
            continue
        with tarfile.open(shard) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    return total


def write_shards(csv_path, out, image_root=None, shard_size: int = 2000, progress: bool = True) -> List[Path]:
    """Writes the pairs of an ``image,caption[,label]`` CSV as shards ``out/00000.tar``, ... and
    ``out/sizes.json``. JPEG files are stored as they are; other images are encoded as JPEG (quality
    95), since ``jpg`` is the member open_clip's loaders read; every image is decoded first, so a bad one
    fails here and not in training. Refuses a non-empty ``out``; a failed run removes what it wrote, and
    the index goes last (atomically), so an interrupted one never looks complete."""
    import webdataset as wds
    from tqdm import tqdm

    from par.data import caption_column, image_paths, integer_labels, open_image, read_csv
    from par.utils import atomic_write_text, check_output_dir

    if isinstance(shard_size, bool) or not isinstance(shard_size, numbers.Integral) or shard_size < 1:
        raise ParError(f"shard_size must be a whole number of at least 1, got {shard_size!r}")
    out = check_output_dir(out, "shard folder")
    if out.exists() and any(out.iterdir()):
        raise ParError(f"{out} is not empty; shards are written to a new folder (nothing overwritten)")
    frame = read_csv(csv_path, ["image", "caption"])
    paths = image_paths(frame, csv_path, image_root)
    captions = caption_column(frame, csv_path)
    labels = integer_labels(frame, csv_path) if "label" in frame.columns else None
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict = {}
    try:
        # by count alone (webdataset also closes a shard at 3 GB by default, which would split the shards
        # otherwise than the index below counts them)
        with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, maxsize=float("inf"), verbose=0) as sink:
            for i in tqdm(range(len(paths)), desc="write shards", unit="pair", disable=not progress):
                image = open_image(paths[i])  # every image decodes, JPEG or not, before it is stored
                data = paths[i].read_bytes()
                if not data.startswith(b"\xff\xd8"):  # not a JPEG: encode the decoded image as one
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG", quality=95)
                    data = buffer.getvalue()
                sample = {"__key__": f"{i:09d}", "jpg": data, "txt": captions[i]}
                if labels is not None:
                    sample["cls"] = labels[i]
                sink.write(sample)
                name = f"{i // shard_size:05d}.tar"
                sizes[name] = sizes.get(name, 0) + 1
    except BaseException:  # a bad image or an interrupt: leave no partial set behind (the folder was new or empty)
        for tar in out.glob("*.tar"):
            tar.unlink()
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    atomic_write_text(out / SIZES, json.dumps(sizes, indent=1) + "\n")  # last: its presence means complete
    return [out / name for name in sizes]


class ShardPairs(torch.utils.data.IterableDataset):
    """An endless, seeded stream of ``(uint8 image, token ids, caption, label)`` from this rank's
    shards (label -1 when the shards carry no ``cls``). ``set_epoch`` reseeds the shard order and
    the shuffle buffer, so an epoch's stream is the same every time it is read (resuming skips into it)."""

    def __init__(self, pattern: str, tokenizer, size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 buffer: int = 2000, needs_labels: bool = False):
        from par.data import eval_transform

        shards = expand(pattern)
        if len(shards) < world_size:
            raise ParError(f"{pattern}: {len(shards)} shard(s) for {world_size} processes; "
                           f"write at least one shard per process (python -m par shards --shard-size)")
        self.pattern, self.shards = pattern, [str(s) for s in shards[rank::world_size]]
        self.total = count_samples(shards)
        self.tokenizer, self.transform = tokenizer, eval_transform(size)
        self.seed, self.rank, self.buffer, self.needs_labels = seed, rank, buffer, needs_labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _passes(self) -> Iterator[List[str]]:
        """This rank's shards, pass after pass, each pass in a fresh seeded order."""
        rng = random.Random(f"{self.seed}/{self.rank}/{self.epoch}")
        for _ in itertools.count():
            order = list(self.shards)
            rng.shuffle(order)
            yield order

    def _decode(self, sample: dict):
        from par.data import open_image

        where = f"{sample.get('__url__', self.pattern)}: sample {sample.get('__key__')}"
        if "txt" not in sample:
            raise ParError(f"{where} has no caption (.txt member); members: {sorted(k for k in sample if not k.startswith('__'))}")
        if "jpg" not in sample:
            raise ParError(f"{where} has no image (.jpg member)")
        if self.needs_labels and "cls" not in sample:
            raise ParError(f"{where} has no class label (.cls member), which this objective trains on")
        image = self.transform(open_image(io.BytesIO(sample["jpg"]), name=f"{where} (.jpg)"))
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise ParError(f"{where}: its caption (.txt) is not UTF-8 text") from None
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError:
            raise ParError(f"{where}: its class label (.cls) is not a whole number: {sample['cls'][:20]!r}") from None
        return image, self.tokenizer([caption])[0], caption, label

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"{self.seed}/{self.rank}/{self.epoch}/{worker}")
        # the buffer shuffles one pass at a time and empties before the next starts: across passes it would
        # serve the next pass's pairs while about a buffer of this one's were never read (an epoch of 250k
        # pairs, buffer 2,000, 12 workers: ~5-10 % of it seen twice, as many not at all)
        if not self.shards[worker::workers]:  # no shard of its own (ShardLoader refuses this): nothing, not repeats
            return
        for order in self._passes():
            samples = wds.tarfile_to_samples()(iter([{"url": url} for url in order[worker::workers]]))
            for sample in wds.shuffle(bufsize=self.buffer, initial=min(self.buffer, 100), rng=rng)(samples):
                yield self._decode(sample)


def collate_pairs(items):
    """A batch of ``ShardPairs`` items: (images, tokens, captions, labels or None)."""
    images, tokens, captions, labels = zip(*items)
    labels = None if min(labels) < 0 else torch.tensor(labels)
    return torch.stack(images), torch.stack(tokens), list(captions), labels


class ShardLoader:
    """The training loop's view of shards: ``epoch(e, skip)`` yields that epoch's batches
    ``(images, tokens, captions, labels or None)`` after the first ``skip`` (resuming re-reads and
    drops them: the stream is seeded, so the batches that follow are the ones an unbroken run saw).

    Workers take turns over the process's shards and yield alike, so an epoch reads each pair once only
    when every worker holds as many pairs; where w workers do not divide S shards, those holding fewer run
    into the next pass (25 equal shards, 8 workers: 3.5 % of an epoch read twice, as much not read). Fewer
    shards than workers is refused: there the extra workers would read nothing but repeats."""

    def __init__(self, stream: ShardPairs, local_batch: int, global_batch: int, workers: int = 0,
                 pin_memory: bool = False):
        if workers > len(stream.shards):  # a worker's share of the stream is whole shards
            raise ParError(f"{stream.pattern}: {len(stream.shards)} shard(s) for this process but {workers} loader "
                           f"workers; each worker reads whole shards and all yield alike, so the extra workers would "
                           f"re-read shards of the next pass (an epoch seeing some pairs twice and others never): write "
                           f"at least {workers} shards per process (python -m par shards --shard-size) or lower workers")
        self.stream, self.local_batch, self.workers, self.pin_memory = stream, local_batch, workers, pin_memory
        self.batches_per_epoch = stream.total // global_batch
        if self.batches_per_epoch < 1:
            raise ParError(f"{stream.pattern} holds {stream.total} samples, fewer than one batch of {global_batch}")

    def epoch(self, epoch: int, skip: int = 0):
        self.stream.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.local_batch, num_workers=self.workers,
                                             collate_fn=collate_pairs, pin_memory=self.pin_memory)
        return itertools.islice(loader, skip, self.batches_per_epoch)
