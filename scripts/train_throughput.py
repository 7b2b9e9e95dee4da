"""PAR training throughput and MFU, with synthetic tensors and (optionally) the real loader.

    python scripts/train_throughput.py --model ViT-B-32 --batch 256 --precision fp32 amp amp_bf16
    python scripts/train_throughput.py --model ViT-B-32 --data runs/world224/train.csv --workers 12
    python scripts/train_throughput.py --model ViT-B-32 --data 'shards/{00000..00099}.tar' --workers 12

A PAR step is one forward + backward of the trainable model and one forward of the frozen
copy: about 4x the forward FLOPs, counted with torch's FlopCounterMode. MFU = achieved FLOP/s
over the device's peak (``--peak-tflops``; known for H100/H200 bf16/fp16 dense). With
``--data`` (a CSV or a shard pattern) the same step is fed by the training loop's own loader (``PairLoader`` or
``ShardLoader``), so the cost of
decoding shows up as the gap to the synthetic figure. Writes a JSON record per setting to
``--out`` and prints a table.
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_TFLOPS = {  # dense tensor-core peaks per precision (fp32 = TF32 tensor cores)
    "H100": {"fp32": 495.0, "amp": 989.0, "amp_bf16": 989.0},
    "H200": {"fp32": 495.0, "amp": 989.0, "amp_bf16": 989.0},
}


def forward_flops(model, images, tokens) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, tokens)
    return counter.get_total_flops()


def measure(model, frozen, batches, precision, device, steps, warmup):
    from open_clip import ClipLoss

    from par.augment import par_augment
    from par.losses import par_terms
    from par.utils import autocast

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp")
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    seen, start = 0, None
    for i, (raw, tokens) in enumerate(batches(steps + warmup)):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.time(), 0
        raw, tokens = raw.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        images = par_augment(raw.float().div_(255), mean, std)
        with autocast(precision, device):
            image, text, scale = model(images, tokens)
            with torch.no_grad():
                f_image, f_text, _ = frozen(images, tokens)
            loss = par_terms(image, text, f_image, f_text, scale, 2.15, loss_fn)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += raw.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.time() - start)


def main() -> int:
    from par import models
    from par.data import PairLoader, caption_dataset
    from par.shards import ShardLoader, ShardPairs, is_shard_pattern

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", nargs="+", default=["fp32", "amp", "amp_bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", "--csv", dest="data", help="image,caption CSV or shard pattern: also measure with the real loader")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default="runs/train_throughput.jsonl")
    args = parser.parse_args()

    from par.utils import pick_device

    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = models.create_model(args.model).to(device).train()
    model.logit_scale.requires_grad_(False)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    if args.compile:
        model, frozen = torch.compile(model), torch.compile(frozen)
    size = models.image_size(model)
    tokenizer = models.get_tokenizer(args.model)
    tokens = tokenizer(["a photo of a banana on a wooden table."] * args.batch)
    raw = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    flops = forward_flops(models.create_model(args.model), raw[:2].float(), tokens[:2]) / 2 * 4  # per sample, PAR step
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    def synthetic(n):
        for _ in range(n):
            yield raw, tokens

    sources = {"synthetic": synthetic}
    if args.data:
        pin = device.type == "cuda"
        if is_shard_pattern(args.data):
            loader = ShardLoader(ShardPairs(args.data, tokenizer, size), args.batch, args.batch, args.workers, pin)
        else:
            dataset = caption_dataset(args.data, tokenizer, size)
            loader = PairLoader(dataset, dataset.captions, None, args.batch, workers=args.workers, pin_memory=pin)

        def real(n):
            produced, epoch = 0, 0
            while produced < n:
                for images, toks, _, _ in loader.epoch(epoch):
                    yield images, toks
                    produced += 1
                    if produced >= n:
                        return
                epoch += 1

        sources["loader"] = real

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}: {args.model} @ {size}px, batch {args.batch}, {flops / 1e9:.1f} GFLOP per sample per PAR step")
    print(f"{'source':<10}{'precision':<10}{'samples/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for precision in args.precision:
        if device.type == "cpu" and precision == "amp":
            print(f"{'':<10}{precision:<10} skipped: fp16 autocast is for CUDA")
            continue
        for source, batches in sources.items():
            rate = measure(model, frozen, batches, precision, device, args.steps, args.warmup)
            tflops = rate * flops / 1e12
            peak = args.peak_tflops or (peaks or {}).get(precision)
            mfu = tflops / peak if peak else None
            record = {"device": name, "model": args.model, "batch": args.batch, "precision": precision,
                      "source": source, "samples_per_s": round(rate, 1), "tflops": float(f"{tflops:.4g}"),
                      "mfu": float(f"{mfu:.4g}") if mfu is not None else None, "compile": args.compile}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{source:<10}{precision:<10}{rate:>12.1f}{tflops:>10.2f}{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
