"""Evaluation throughput: images/s of clean zero-shot evaluation against the model's pure forward.

    python scripts/eval_throughput.py --model par-tiny-vit --data runs/demo/world/test.csv \
        --classnames runs/demo/world/classnames.txt [--workers 2] [--batch 256] [--attack badnet_rs]

Three figures on the same device and batch size: the encoder's forward on tensors already
in memory (the ceiling), par's evaluation loop on the real files (decode + resize + forward),
and the same loop with a trigger applied on the fly. The gaps are the cost of decoding and
of triggering. Appends a JSON record to ``--out``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from par import attacks, models
    from par.data import labelled_dataset, load_classnames, load_templates
    from par.eval.zeroshot import predict, zero_shot_classifier
    from par.utils import autocast, inference_precision, pick_device

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="par-tiny-vit")
    parser.add_argument("--checkpoint", help="weights (default: random init; speed does not depend on them)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--classnames", required=True)
    parser.add_argument("--templates", default="openai")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--attack", default="badnet_rs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/eval_throughput.jsonl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    model = (models.load_model(args.model, args.checkpoint, device) if args.checkpoint
             else models.create_model(args.model).to(device).eval())
    mean, std = models.image_mean_std(model)
    classnames = load_classnames(args.classnames)
    dataset = labelled_dataset(args.data, classnames, models.image_size(model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    classifier = zero_shot_classifier(model, models.get_tokenizer(args.model), classnames,
                                      load_templates(args.templates), device)

    def timed(fn):
        fn()  # warm-up (and worker start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(dataset) / (time.time() - start)

    size = models.image_size(model)
    batch = torch.rand(args.batch, 3, size, size, device=device)
    n_batches = -(-len(dataset) // args.batch)

    @torch.inference_mode()
    def forward_only():
        for _ in range(n_batches):
            with autocast(inference_precision(device), device):
                model.encode_image(batch, normalize=True)

    trigger = attacks.get_trigger(args.attack)
    figures = {
        "forward_only": timed(forward_only),
        "clean_eval": timed(lambda: predict(model, classifier, loader, mean, std, device, progress=False)),
        "triggered_eval": timed(lambda: predict(model, classifier, loader, mean, std, device, trigger, progress=False)),
    }
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "model": args.model, "images": len(dataset), "batch": args.batch, "workers": args.workers,
              "attack": trigger.name, **{k: round(v, 1) for k, v in figures.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    for key, value in figures.items():
        print(f"{key:<16}{value:>10.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
