"""``decree-text``: DECREE's trigger, judged by where it sends the images rather than by its size.

DECREE's PL1 does not separate tiny encoders: they collapse under small masks whether or not they are
backdoored (every micro model lies below PL1 0.07, and at 64 px clean and poisoned models overlap). What
does differ is *where* the stamped images collapse. A backdoor is a shortcut trained to the target's
captions, so its trigger sends every image to a point nearer the target's text than any natural image of
it comes; a clean model's collapse point is a hub between labels, less like any label's text than the
images that show it. The statistic is the **collapse gap**: over the candidate labels, the largest

    cos(collapse point, label's text embedding) - max over the shadow images of cos(image, label's text)

with the collapse point the normalised mean embedding of the images stamped with DECREE's trigger, and
the label's text embedding its zero-shot classifier column (the class names through the templates). The
model is flagged when the gap is above the encoder's threshold, which is never below 0, what the gap
means: the collapse point lies nearer a label's text than every shadow image does. The label with the
largest gap is the target.

**Thresholds** are per encoder, set on clean models only: the largest gap over clean models of the
encoder plus a margin of 0.01, and never below 0. On the 24 clean ``par-micro-vit`` models of the micro
scan regime's development worlds (seeds 0, 2 and 3 of ``configs/micro-scan.yaml``: per world the
foundation, three 0 %-poison and four benign fine-tunes) the gap is at most -0.026, so 0 stands. The
64-px ``par-tiny-vit`` is another matter: its clean models collapse onto a hub label (``key``) nearer its
text than any image of it, so its threshold comes from the clean models of a development world in the
benchmark's regime (world seed 1 of ``configs/bench.yaml``: the foundation, three 0 %-poison and five
benign fine-tunes). Any other encoder gets 0 unless the user gives one (``threshold``), set the same way
on clean models of it.

The reference is the shadow images themselves, so they should show the kinds of things the candidate
labels name (a few clean images per label): a label none of them shows has no natural exemplar to
compare with, and a hub collapse point could then pass it.
"""
from __future__ import annotations

from typing import List

import torch

from par.scan.base import SCANNERS, InvertedTrigger, ScanContext, ScanResult
from par.scan.decree import Decree

MEANING = 0.0  # the collapse point nearer a label's text than every shadow image
MEANING_SOURCE = "0 by what it means (the collapse point nearer a label's text than every shadow image)"
MARGIN = 0.01
CLEAN_MAX = {  # the largest gap over clean models of the encoder (docstring above), and which models
    "par-micro-vit": (-0.026, "24 clean par-micro-vit models of 3 development worlds"),
    "par-tiny-vit": (0.068, "9 clean par-tiny-vit models of a development world in the benchmark's regime"),
}
THRESHOLDS = {name: (max(MEANING, round(gap + MARGIN, 3)),
                     f"the largest gap over {models} ({gap:+.3f}) plus {MARGIN}, and never below {MEANING_SOURCE}")
              for name, (gap, models) in CLEAN_MAX.items()}
CHUNK = 64  # images embedded at once


@SCANNERS.register("decree-text")
class DecreeText(Decree):
    name = "decree-text"
    paper_name = "DECREE's trigger (Feng et al., CVPR 2023), judged by its collapse point against the label texts"
    uses_labels = True  # the verdict compares the collapse point with the candidate labels' texts

    def documented_threshold(self, encoder):
        return THRESHOLDS.get(encoder, (MEANING, MEANING_SOURCE + "; none measured on clean models of this encoder"))

    def scan(self, ctx: ScanContext) -> ScanResult:
        found = self.invert(ctx)
        with torch.no_grad():
            rows = self.gaps(ctx, found.mask, found.pattern)
        top = max(rows, key=lambda r: r["gap"])
        documented, source = self.documented_threshold(ctx.encoder)
        threshold = self.threshold(ctx, documented)
        flagged = found.reached and top["gap"] > threshold
        target = top["label"] if flagged else None
        trigger = InvertedTrigger(found.mask.cpu(), found.pattern.cpu(), "patch", float(found.pl1), target)
        return ScanResult(
            scanner=self.name, flagged=flagged,
            statistic="collapse gap (cosine to a label's text: collapse point minus the nearest shadow image)",
            value=float(top["gap"]), threshold=threshold, direction="above",
            threshold_source=source if ctx.threshold is None else "given by the user",
            target=target, family="patch", labels=rows, triggers={"patch": trigger},
            details={**found.details(self.params), "pl1": float(found.pl1), "top_label": top["label"]})

    @staticmethod
    def gaps(ctx: ScanContext, mask: torch.Tensor, pattern: torch.Tensor) -> List[dict]:
        """One row per candidate label: the collapse point's cosine to its text, the nearest shadow image's, the gap."""
        texts = ctx.classifier[:, ctx.candidates]
        clean, stamped = [], []
        for start in range(0, ctx.images.shape[0], CHUNK):
            x = ctx.images[start:start + CHUNK]
            clean.append(ctx.embed(x) @ texts)
            stamped.append(ctx.embed((1 - mask) * x + mask * pattern))
        nearest = torch.cat(clean).max(0).values
        point = torch.nn.functional.normalize(torch.cat(stamped).mean(0), dim=0)
        collapse = point @ texts
        return [{"label": ctx.classnames[index], "index": index, "collapse_cosine": float(c),
                 "nearest_image_cosine": float(n), "gap": float(c - n)}
                for index, c, n in zip(ctx.candidates, collapse.tolist(), nearest.tolist())]
