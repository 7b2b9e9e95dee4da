"""Markdown tables of measured throughput, for the README: training (encoder x precision x compile ->
samples/s, MFU, peak memory) from ``train_throughput.py``'s JSONL, and the loader beside the step
from ``loader_throughput.py``'s.

    python scripts/throughput_table.py --train runs/train_throughput.jsonl --loader runs/loader_throughput.jsonl

A setting measured more than once is shown as its last measurement.
"""
import argparse
import json
import sys
from pathlib import Path


def records(path):
    if not path:
        return []
    if not Path(path).is_file():
        print(f"{path}: not found, left out", file=sys.stderr)
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_table(rows) -> str:
    last = {}
    for r in rows:
        key = (r["device"], r["model"], r.get("objective", "par"), r["batch"], r["precision"], r["compile"],
               r.get("grad_checkpointing", False), r["source"])
        last[key] = r
    lines = ["| GPU | encoder | step | batch | precision | compile | grad ckpt | input | samples/s | MFU | peak GiB |",
             "| --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: |"]
    for (device, model, objective, batch, precision, compiled, ckpt, source), r in last.items():
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "n/a"
        lines.append(f"| {device} | {model} | {objective} | {batch} | {precision} | {'yes' if compiled else 'no'} | "
                     f"{'yes' if ckpt else 'no'} | {source} | {r['samples_per_s']:.0f} | {mfu} | {peak} |")
    return "\n".join(lines)


def loader_table(rows) -> str:
    lines = ["| input | workers | size | images/s | per worker | x step |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['ratio_to_step']:.2f}" if r.get("ratio_to_step") is not None else "n/a"
        lines.append(f"| {r['kind']} | {r['workers']} | {r['size']} | {r['images_per_s']:.0f} | {r['per_worker']:.0f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", help="train_throughput.py JSONL")
    parser.add_argument("--loader", help="loader_throughput.py JSONL")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)
    parts = []
    train, loader = records(args.train), records(args.loader)
    if train:
        parts.append(train_table(train))
    if loader:
        parts.append(loader_table(loader))
    if not parts:
        parser.error("no records: give --train and/or --loader files with measurements")
    text = "\n\n".join(parts) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
