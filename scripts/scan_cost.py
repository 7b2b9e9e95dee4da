"""What a ``label-inversion`` scan of an encoder costs, from a timing of the scanner's own inversion step.

    python scripts/scan_cost.py --model ViT-B-32 --labels 1000            # ImageNet's 1,000 labels
    python scripts/scan_cost.py --model par-tiny-vit --labels 12 --device cpu

The scanner's cost is almost all stamped-image forwards and backwards through the image tower (the model
frozen, gradients to the trigger), in three phases: the ranking pass (``rank_steps`` patch steps for every
candidate, only when there are more than ``top_k + reference_labels``), the full inversion of the top k and
the reference labels (``steps`` per family), and the refinement of the flagged label's patch
(``refine_steps``). This times ``LabelInversion._optimise`` (the code a scan runs) on random weights and
random images for each family, per stamped image, and multiplies by each phase's count of stamped images at
the scanner's settings; the zero-shot classifier (every label's templates through the text tower) is timed
on one label's templates. Time per image does not depend on the weights, so random ones give the real figure.
Prints a table and, with ``--out``, writes it as JSON.

``--run DIR`` also runs one real scan (``python -m par scan``'s code) of a random-weights checkpoint on
``--images`` random images and the first ``--labels`` of ImageNet's class names, all written in DIR, and
reports its wall time beside the estimate (``run`` in the JSON): the timed scan the estimate is checked by.
Its verdict means nothing (random weights); its cost is a real scan's.

    python scripts/scan_cost.py --model ViT-B-32 --labels 1000 --images 500 --device cuda --run /tmp/scan-run
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from par import models  # noqa: E402
from par.data import load_classnames, load_templates  # noqa: E402
from par.scan import ScanConfig, scan_checkpoint  # noqa: E402
from par.scan.base import ScanContext, make_scanner  # noqa: E402
from par.utils import autocast, inference_precision, pick_device  # noqa: E402


def _timed(work, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def per_stamped_image(scanner, ctx: ScanContext, family: str, labels: int, steps: int) -> dict:
    """Seconds per stamped image of one step of ``scanner``'s inversion (forward and backward) and of the
    no-grad forward that ends every inversion, timed apart (after one untimed warm-up): a step costs about
    three forwards, so one figure for both would misprice whichever phase has the fewer steps."""
    chosen, stamped = list(range(labels)), labels * ctx.images.shape[0]
    scanner._optimise(ctx, family, chosen, 1, "timing (warm-up)")
    forward = _timed(lambda: scanner._optimise(ctx, family, chosen, 0, "timing"), ctx.device)
    run = _timed(lambda: scanner._optimise(ctx, family, chosen, steps, "timing"), ctx.device)
    return {"step": max(run - forward, 0.0) / (stamped * steps), "forward": forward / stamped}


def estimate(model_name: str, labels: int, images: int, timing_images: int, timing_steps: int, device: str,
             scanner_params: dict, top_k: int, templates: str, precision: str = "auto") -> dict:
    device = pick_device(device)
    precision = inference_precision(device) if precision == "auto" else precision  # as a scan resolves it
    model = models.create_model(model_name).to(device).eval().requires_grad_(False)
    size = models.image_size(model)
    mean, std = models.image_mean_std(model)
    scanner = make_scanner("label-inversion", scanner_params)
    p = scanner.params
    with torch.no_grad():
        width = model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1]
    generator = torch.Generator().manual_seed(0)
    classifier = torch.nn.functional.normalize(torch.randn(width, labels, generator=generator), dim=0).to(device)
    ctx = ScanContext(model=model, images=torch.rand(timing_images, 3, size, size, generator=generator).to(device),
                      mean=mean, std=std, device=device, classnames=[f"label {i}" for i in range(labels)],
                      classifier=classifier, candidates=list(range(labels)), top_k=top_k, progress=False,
                      precision=precision)
    chunk = max(1, min(labels, p.batch_images // images))  # labels inverted together in a real scan
    chunk_for_timing = max(1, min(chunk, p.batch_images // timing_images))
    seconds = {family: per_stamped_image(scanner, ctx, family, chunk_for_timing, timing_steps) for family in p.families}

    tokenizer = models.get_tokenizer(model_name)
    prompts = [t("banana") for t in load_templates(templates)]  # templates are callables, as open_clip's
    with torch.no_grad(), autocast(precision, device):
        model.encode_text(tokenizer(prompts[:1]).to(device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()  # the warm-up's queued work is not timed
        started = time.perf_counter()
        model.encode_text(tokenizer(prompts).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        text_seconds = (time.perf_counter() - started) * labels

    pruned = labels > top_k + p.reference_labels
    inverted = min(labels, top_k + p.reference_labels) if pruned else labels
    phases = [("zero-shot classifier", labels * len(prompts), text_seconds, "text prompts")]
    def inversions(how_many: int, steps: int, family: str) -> tuple:  # (stamped images, seconds): steps + the forward
        cost = seconds[family]
        return how_many * (steps + 1) * images, how_many * images * (steps * cost["step"] + cost["forward"])

    if pruned:
        phases.append(("ranking pass", *inversions(labels, p.rank_steps, "patch"), "stamped images"))
    for family in p.families:
        phases.append((f"full inversion ({family})", *inversions(inverted, p.steps, family), "stamped images"))
    if "patch" in p.families and p.refine_steps:  # a step each, no closing forward
        count = p.refine_steps * images
        phases.append(("refinement (flagged label)", count, count * seconds["patch"]["step"], "stamped images"))
    total = sum(s for _, _, s, _ in phases)
    per_label = sum(s for name, _, s, _ in phases if name.startswith("full")) / inverted
    return {"model": model_name, "image_size": size, "device": str(device), "precision": precision,
            "labels": labels, "images": images,
            "pruned": pruned, "inverted_fully": inverted, "scanner_params": {k: getattr(p, k) for k in
                                                                              ("steps", "rank_steps", "refine_steps",
                                                                               "batch_images", "reference_labels")},
            "top_k": top_k, "seconds_per_stamped_image": seconds, "timing_images": timing_images,
            "timing_steps": timing_steps,
            "phases": [{"phase": n, "count": c, "unit": u, "seconds": round(s, 2)} for n, c, s, u in phases],
            "seconds_per_label_inverted": round(per_label, 2),
            "seconds_per_label_ranked": round(inversions(1, p.rank_steps, "patch")[1], 3) if pruned else None,
            "total_seconds": round(total, 1)}


def timed_scan(model_name: str, labels: int, images: int, device: str, precision: str, scanner_params: dict,
               top_k: int, templates: str, folder: Path) -> dict:
    """One real scan, timed: a random-weights checkpoint, ``images`` random JPEGs and the first ``labels``
    ImageNet class names written in ``folder``, scanned as ``python -m par scan`` would scan them."""
    from PIL import Image

    model = models.create_model(model_name)
    checkpoint = models.save_checkpoint(model, folder / "random-weights.pt")
    size = models.image_size(model)
    pictures = folder / "images"
    pictures.mkdir(parents=True, exist_ok=True)
    for earlier in pictures.glob("*.jpg"):  # a folder reused: only this run's images
        earlier.unlink()
    generator = torch.Generator().manual_seed(0)
    for i in range(images):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(pictures / f"{i:05d}.jpg", quality=90)
    names = folder / "classnames.txt"
    names.write_text("\n".join(load_classnames("imagenet")[:labels]) + "\n")
    started = time.perf_counter()
    result = scan_checkpoint(ScanConfig(checkpoint=str(checkpoint), model=model_name, images=str(pictures),
                                        classnames=str(names), templates=templates, top_k=top_k, max_images=images,
                                        device=device, precision=precision, scanner_params=scanner_params))
    return {"seconds": round(time.perf_counter() - started, 1), "precision": result.settings["precision_used"],
            "images": result.settings["images_used"], "labels": labels, "inverted_fully": result.details["inverted"],
            "rank_seconds_per_label": result.details.get("rank_seconds_per_label"),
            "seconds_per_label_inverted": round(result.seconds_per_label, 3), "refined": "refined" in result.details}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--labels", type=int, default=1000, help="candidate labels (ImageNet: 1000)")
    parser.add_argument("--images", type=int, default=128, help="shadow images of the scan estimated")
    parser.add_argument("--timing-images", type=int, help="images per label in the timed steps (default: --images, "
                                                           "the real batch; fewer is quicker but a CPU runs small "
                                                           "batches less efficiently, so it overestimates)")
    parser.add_argument("--timing-steps", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--templates", default="openai")
    parser.add_argument("--scanner-param", action="append", default=[], metavar="KEY=VALUE",
                        help="label-inversion setting, e.g. steps=60 (as python -m par scan takes it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto (a scan's default: bf16 autocast on CUDA, fp32 on "
                                                            "the CPU) | fp32 | amp | amp_bf16")
    parser.add_argument("--run", metavar="DIR", help="also run one real scan on random weights and images written "
                                                     "here, timed")
    parser.add_argument("--out", help="write the estimate as JSON here")
    args = parser.parse_args(argv)
    from par.app.cli import parse_key_values  # the scan command's own reading of KEY=VALUE

    params = parse_key_values(args.scanner_param, "--scanner-param")
    if args.run and args.labels > len(load_classnames("imagenet")):
        print(f"error: --run names its labels from ImageNet's 1,000 classes; --labels {args.labels} is more",
              file=sys.stderr)
        return 2
    record = estimate(args.model, args.labels, args.images, args.timing_images or args.images, args.timing_steps,
                      args.device, params, args.top_k, args.templates, args.precision)
    show(record)
    if args.out:  # the estimate first: a real scan stopped by a time limit leaves it
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.run:
        record["run"] = timed_scan(args.model, args.labels, args.images, args.device, args.precision, params,
                                   args.top_k, args.templates, Path(args.run))
        run = record["run"]
        print(f"one real scan ({run['labels']} labels, {run['images']} images, {run['precision']}, random weights): "
              f"{run['seconds']:,.1f} s ({run['seconds'] / 60:,.1f} min) against {record['total_seconds']:,.1f} s "
              f"estimated")
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


def show(record: dict) -> None:
    print(f"label-inversion on {record['model']} ({record['image_size']} px, {record['device']}, "
          f"{record['precision']}), {record['labels']} labels, {record['images']} shadow images:")
    print("| phase | count | seconds |\n|---|---|---|")
    for phase in record["phases"]:
        print(f"| {phase['phase']} | {phase['count']:,} {phase['unit']} | {phase['seconds']:,.1f} |")
    print(f"| **total** | | **{record['total_seconds']:,.1f}** ({record['total_seconds'] / 60:,.1f} min) |")
    print(f"per label inverted fully: {record['seconds_per_label_inverted']} s"
          + (f"; per label ranked: {record['seconds_per_label_ranked']} s" if record["pruned"] else ""))


if __name__ == "__main__":
    sys.exit(main())
