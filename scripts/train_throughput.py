"""Training throughput, MFU and peak memory of the training loop's own step, with synthetic tensors
and (optionally) the real loader.

    python scripts/train_throughput.py --model ViT-B-32 --batch 256 --precision fp32 amp amp_bf16
    python scripts/train_throughput.py --model ViT-L-14-336 --batch 512 --precision amp_bf16 --grad-checkpointing
    python scripts/train_throughput.py --model ViT-B-32 --data 'shards/{00000..00099}.tar' --workers 12

The step timed is ``par.train.Step``, built by ``par.train.make_step`` (the factory the training loop
uses, with its seeds) from a training config for the model, objective (default ``par``: a forward and
backward of the trainable model, a forward of the frozen copy), augmentation and precision: the batch
onto the device and augmented there, forward and backward, fused AdamW and GradScaler step, the
objective's ``after_step`` hook and the finiteness watch: what ``python -m par train`` runs per step,
less logging. FLOPs per sample are counted by torch's FlopCounterMode over one real forward + backward
of that step (without gradient checkpointing's recomputation, so MFU counts useful work only); MFU =
achieved FLOP/s over the device's peak (``--peak-tflops``; known for H100/H200). With ``--data`` (a CSV
or a shard pattern) the same step is fed by the loop's own loader (``PairLoader`` or ``ShardLoader``),
so the cost of decoding shows up as the gap to the synthetic figure. ``--profile FILE`` writes
torch.profiler's table of a few steps of the last setting. Writes a JSON record per setting to
``--out`` and prints a table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_TFLOPS = {  # dense peaks per precision: fp32 matmuls without TF32 (PyTorch's default, which training and this
    # timing keep; cuDNN's convolutions do use TF32 by default), the half precisions on tensor cores; the first
    # name found in the device's name wins, so the PCIe and NVL cards (lower clocks) come before the SXM one
    "H100 PCIe": {"fp32": 51.0, "amp": 756.0, "amp_bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "amp": 835.5, "amp_bf16": 835.5},
    "H100": {"fp32": 67.0, "amp": 989.0, "amp_bf16": 989.0},
    "H200": {"fp32": 67.0, "amp": 989.0, "amp_bf16": 989.0},
}
CAPTION = "a photo of a banana on a wooden table."


def step_flops(objective, model, batch) -> int:
    """FLOPs of the objective's forward and backward on ``batch``: every forward it makes (the frozen
    copy's too) and the gradients it needs, as executed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # the math kernel: the counter has no entry for the CPU's fused attention, whose FLOPs it would drop
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        objective(objective.step_module(model), batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class Setup:
    """The loop's own step for one precision (``make_step``), and a counter for its step index."""

    def __init__(self, args, precision, device):
        from par.distributed import Dist
        from par.train import make_step, train_config

        self.cfg = train_config({"model": args.model, "train_data": "unused.csv", "out": "unused",
                                 "objective": args.objective, "augment": args.augment, "precision": precision,
                                 "grad_checkpointing": args.grad_checkpointing, "compile": args.compile,
                                 "device": str(device), "batch_size": args.batch, "lr": 1e-6, "progress": False})
        self.one_step = make_step(self.cfg, Dist(), device)
        self.model, self.objective = self.one_step.model, self.one_step.objective
        self.tokenizer = self.objective.context.tokenizer
        self.device, self.precision, self.done = device, precision, 0

    def batch(self, raw, tokens, captions):
        return self.one_step.on_device((raw, tokens, captions, None))

    def step(self, raw, tokens, captions):
        terms = self.one_step((raw, tokens, captions, None), self.done)
        self.done += 1
        return terms


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(setup, batches, steps, warmup):
    """Samples/s over ``steps`` steps after ``warmup`` (compilation, autotuning, loss scale)."""
    seen, start = 0, None
    for i, (raw, tokens, captions) in enumerate(batches(steps + warmup)):
        if i == warmup:
            synchronize(setup.device)
            start, seen = time.time(), 0
        setup.step(raw, tokens, captions)
        seen += raw.shape[0]
    synchronize(setup.device)
    return seen / (time.time() - start)


def profile(setup, batches, path: Path, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for raw, tokens, captions in batches(steps):
            setup.step(raw, tokens, captions)
        synchronize(setup.device)
    key = "cuda_time_total" if setup.device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} steps: {setup.cfg.model}, {setup.precision}, batch {setup.cfg.batch_size}\n"
                    + prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    from par import models
    from par.data import PairLoader, caption_dataset
    from par.shards import ShardLoader, ShardPairs, is_shard_pattern
    from par.utils import pick_device

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--objective", default="par")
    parser.add_argument("--augment", default="par")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", nargs="+", default=["fp32", "amp", "amp_bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", "--csv", dest="data", help="image,caption CSV or shard pattern: also measure with the real loader")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="write torch.profiler's table of the last setting")
    parser.add_argument("--out", default="runs/train_throughput.jsonl")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    probe = Setup(argparse.Namespace(**{**vars(args), "compile": False, "grad_checkpointing": False}), "fp32",
                  torch.device("cpu"))
    size = models.image_size(probe.model)
    tokenizer = probe.tokenizer
    two = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    flops = step_flops(probe.objective, probe.model, probe.batch(two, tokenizer([CAPTION] * 2), [CAPTION] * 2)) / 2
    del probe
    pin = device.type == "cuda"
    raw = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    tokens, captions = tokenizer([CAPTION] * args.batch), [CAPTION] * args.batch
    if pin:  # as the loaders hand batches over
        raw, tokens = raw.pin_memory(), tokens.pin_memory()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    def synthetic(n):
        for _ in range(n):
            yield raw, tokens, captions

    sources = {"synthetic": synthetic}
    if args.data:
        if is_shard_pattern(args.data):
            loader = ShardLoader(ShardPairs(args.data, tokenizer, size), args.batch, args.batch, args.workers, pin)
        else:
            dataset = caption_dataset(args.data, tokenizer, size)
            loader = PairLoader(dataset, dataset.captions, None, args.batch, workers=args.workers, pin_memory=pin)

        def real(n):
            produced, epoch = 0, 0
            while produced < n:
                for images, toks, caps, _ in loader.epoch(epoch):
                    yield images, toks, caps
                    produced += 1
                    if produced >= n:
                        return
                epoch += 1

        sources["loader"] = real

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extras = [k for k in ("compile", "grad_checkpointing") if getattr(args, k)]
    print(f"{name}: {args.model} @ {size}px, {args.objective} step, batch {args.batch}"
          f"{' + ' + ' + '.join(extras) if extras else ''}, {flops / 1e9:.3g} GFLOP per sample per step")
    print(f"{'source':<10}{'precision':<10}{'samples/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}")
    setup = None
    for precision in args.precision:
        if device.type == "cpu" and precision == "amp":
            print(f"{'':<10}{precision:<10} skipped: fp16 autocast is for CUDA")
            continue
        setup = None  # free the previous precision's model before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        setup = Setup(args, precision, device)
        for source, batches in sources.items():
            rate = measure(setup, batches, args.steps, args.warmup)
            peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
            tflops = rate * flops / 1e12
            peak = args.peak_tflops or (peaks or {}).get(precision)
            mfu = tflops / peak if peak else None
            record = {"device": name, "model": args.model, "objective": args.objective, "batch": args.batch,
                      "precision": precision, "source": source, "samples_per_s": round(rate, 1),
                      "tflops": float(f"{tflops:.4g}"), "mfu": float(f"{mfu:.4g}") if mfu is not None else None,
                      "peak_memory_gib": round(peak_gib, 2) if peak_gib is not None else None,
                      "compile": args.compile, "grad_checkpointing": args.grad_checkpointing,
                      "gflop_per_sample": float(f"{flops / 1e9:.4g}"), "torch": torch.__version__}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{source:<10}{precision:<10}{rate:>12.1f}{tflops:>10.2f}"
                  f"{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>8}"
                  f"{(f'{peak_gib:.1f}' if peak_gib is not None else 'n/a'):>10}")
    if args.profile and setup is not None:
        profile(setup, synthetic, Path(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
