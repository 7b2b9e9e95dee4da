"""Data-only benchmark: decoded training images per second from par's real loaders, beside the
training step's samples/s (does the loader keep the GPU fed?).

    python scripts/loader_throughput.py --make-jpegs 4000 --jpeg-size 400 --workers 1 2 --size 224
    python scripts/loader_throughput.py --data 'shards/{00000..00099}.tar' --workers 12 \
        --step-rate runs/train_throughput.jsonl

``--make-jpegs N`` writes N synthetic-world pictures as JPEGs of ``--jpeg-size`` px (CC3M's images
are a few hundred px a side) as a CSV and as shards under ``--work``, and measures both. A source
is read through the loader the training loop uses (``PairLoader`` for a CSV, ``ShardLoader`` for
shards): decode, resize + centre crop to ``--size``, tokenise, collate. ``--step-rate`` takes a
number or a ``train_throughput.py`` JSONL (its best samples/s) and prints loader / step. Writes a
JSON record per setting to ``--out``.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from par import models  # noqa: E402
from par.data import PairLoader, caption_dataset  # noqa: E402
from par.shards import ShardLoader, ShardPairs, is_shard_pattern, write_shards  # noqa: E402


def make_jpegs(work: Path, n: int, size: int) -> tuple:
    """(CSV, shard pattern) of ``n`` synthetic-world pictures as ``size`` px JPEGs (reused if present: kept in
    a folder of their count and size, so another ``--make-jpegs``/``--jpeg-size`` is never the old set)."""
    import pandas as pd
    from PIL import Image

    from par.synthetic import WorldConfig, make_world

    work = work / f"{n}x{size}px"
    csv = work / "jpeg" / "pairs.csv"
    if not csv.is_file():  # written last: an interrupted run is redone (its world reused)
        world = work / "world"
        make_world(WorldConfig(seed=0, image_size=size, train=n, clean=0, test=0, workers=os.cpu_count() or 2), world,
                   reuse=True)
        frame = pd.read_csv(world / "train.csv")
        (work / "jpeg" / "images").mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(frame["image"]):
            with Image.open(world / path) as img:
                img.convert("RGB").save(work / "jpeg" / "images" / f"{i:07d}.jpg", quality=90)
        frame["image"] = [f"images/{i:07d}.jpg" for i in range(len(frame))]
        frame[["image", "caption"]].to_csv(csv, index=False)
    shards = work / "shards"
    if not (shards / "sizes.json").is_file():
        write_shards(csv, shards, shard_size=max(1, n // 16))
    count = len(json.loads((shards / "sizes.json").read_text()))
    return str(csv), str(shards / f"{{00000..{count - 1:05d}}}.tar")


def loader_for(source: str, tokenizer, size: int, batch: int, workers: int):
    pin = torch.cuda.is_available()  # as training pins its batches on a GPU
    if is_shard_pattern(source):
        return ShardLoader(ShardPairs(source, tokenizer, size), batch, batch, workers, pin_memory=pin)
    dataset = caption_dataset(source, tokenizer, size)
    return PairLoader(dataset, dataset.captions, dataset.labels, batch, workers=workers, pin_memory=pin)


def measure(loader, batches: int, warmup: int) -> float:
    """Images/s over ``batches`` batches after ``warmup`` (worker start-up excluded), across epochs."""
    seen, epoch, start = 0, 0, None if warmup else time.perf_counter()
    while True:
        for images, _, _, _ in loader.epoch(epoch):
            if warmup:
                warmup -= 1
                if not warmup:
                    start = time.perf_counter()
                continue
            seen += images.shape[0]
            if seen >= batches * images.shape[0]:
                return seen / (time.perf_counter() - start)
        epoch += 1


def step_rate(spec: str, model: str) -> float:
    """A number, or the fastest ``model`` step a train_throughput.py JSONL holds (the strictest to keep up with)."""
    path = Path(spec)
    if path.is_file():
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rates = [r["samples_per_s"] for r in records if r.get("model") == model]
        if not rates:
            raise SystemExit(f"error: {spec} holds no step of {model} (it has {sorted({r.get('model') for r in records})})")
        return max(rates)
    return float(spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=[], help="image,caption CSVs and/or shard patterns")
    parser.add_argument("--make-jpegs", type=int, default=0, metavar="N", help="also measure N generated JPEGs")
    parser.add_argument("--jpeg-size", type=int, default=400)
    parser.add_argument("--work", default="runs/loader-bench", help="where --make-jpegs writes")
    parser.add_argument("--model", default="ViT-B-32", help="its tokenizer; --size defaults to its image size")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--step-rate", help="training samples/s: a number or a train_throughput.py JSONL")
    parser.add_argument("--out", default="runs/loader_throughput.jsonl")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    tokenizer = models.get_tokenizer(args.model)
    step = step_rate(args.step_rate, args.model) if args.step_rate else None  # before the JPEGs are made
    sources = list(args.data)
    if args.make_jpegs:
        sources += list(make_jpegs(Path(args.work), args.make_jpegs, args.jpeg_size))
    if not sources:
        parser.error("give --data and/or --make-jpegs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'source':<44}{'workers':>8}{'images/s':>11}{'per worker':>12}" + (f"{'x step':>9}" if step else ""))
    for source in sources:
        for workers in args.workers:
            rate = measure(loader_for(source, tokenizer, args.size, args.batch, workers), args.batches, args.warmup)
            per_worker = rate / max(1, workers)
            record = {"source": source, "kind": "shards" if is_shard_pattern(source) else "csv", "workers": workers,
                      "size": args.size, "batch": args.batch, "images_per_s": round(rate, 1),
                      "per_worker": round(per_worker, 1), "step_samples_per_s": step,
                      "ratio_to_step": round(rate / step, 3) if step else None}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            shown = source if len(source) <= 42 else "..." + source[-39:]
            print(f"{shown:<44}{workers:>8}{rate:>11.1f}{per_worker:>12.1f}" + (f"{rate / step:>9.2f}" if step else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
