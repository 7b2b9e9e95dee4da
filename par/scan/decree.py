"""``decree``: DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023), label-free.

A backdoored image encoder maps every image carrying its trigger to nearly the same embedding, so a
small trigger that makes the shadow images' embeddings collapse exists only when a backdoor does.
DECREE learns a mask ``m`` (``1 x H x W``) and a pattern ``p`` (``3 x H x W``), both through a sigmoid,
minimising ``-(mean pairwise cosine similarity of the stamped images' embeddings) + lam * ||m||_1`` on
batches of the shadow images with Adam. ``lam`` starts at 1e-3 and is multiplied by 5 after
``patience`` consecutive steps that meet the similarity target and divided by 5 after as many that
miss it; the smallest mask that met the target is kept. The statistic is
``PL1 = ||m||_1 / (H * W)``; the encoder is flagged when it is below the threshold. DECREE itself says
whether an encoder is backdoored, not toward which label (it never sees one). Here the verdict stays
label-free, and the target is then read off the trigger found: the images stamped with it collapse onto
one embedding, and a backdoored encoder's collapse point is its target, so the label the zero-shot
classifier gives most of the stamped images is named (with the share it gets).

Settings are the paper's (similarity target 0.99, lr 0.5, batch 32): the micro world's clean models
reach the 0.99 target within 300 steps at 32 px, so no lower target was needed, and lr 0.5 does not
diverge there. **Thresholds** are per encoder, set on clean models only. The 0.1 of DECREE's reproductions
is for 224-px encoders; tiny encoders collapse under smaller masks whether or not they are backdoored (at 32
px every micro model lies below 0.07), so ``par-micro-vit`` has its own: the smallest PL1 over the 24 clean
models of the micro scan regime on three development worlds (seeds 0, 2 and 3 of
``configs/micro-scan.yaml``: per world the foundation, three 0 %-poison fine-tunes and four benign
fine-tunes), less 5 %; the 64-px ``par-tiny-vit`` has its own, set the same way on the 9 clean models of a
development world in the benchmark's regime (world seed 1 of ``configs/bench.yaml``: the foundation,
three 0 %-poison and five benign fine-tunes). Any other encoder gets 0.1 unless the user gives one
(``threshold``), set the same way on clean models of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from par.errors import ParError
from par.scan.base import SCANNERS, InvertedTrigger, ScanContext, ScannerParams, ScanResult, Scanner, check_finite

PL1_THRESHOLD = 0.1
THRESHOLD_SOURCE = "the PL1 cut-off of DECREE's reproductions on 224-px encoders"
CLEAN_MIN = {  # the smallest PL1 over clean models of the encoder (docstring above), and which models
    "par-micro-vit": (0.044, "24 clean par-micro-vit models of 3 development worlds"),
    "par-tiny-vit": (0.0237, "9 clean par-tiny-vit models of a development world in the benchmark's regime"),
}
BELOW_CLEAN = 0.95
THRESHOLDS = {name: (round(pl1 * BELOW_CLEAN, 4),
                     f"the smallest PL1 over {models} ({pl1}) less {round(100 * (1 - BELOW_CLEAN))} %")
              for name, (pl1, models) in CLEAN_MIN.items()}


@dataclass
class DecreeParams(ScannerParams):
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.5  # the paper's
    lam: float = 1e-3  # initial weight of ||m||_1
    lam_factor: float = 5.0  # lam is multiplied or divided by this ...
    patience: int = 5  # ... after this many consecutive steps that meet (or miss) the similarity target
    similarity: float = 0.99  # the target: mean pairwise cosine similarity of the stamped embeddings


@dataclass
class Collapse:
    """What DECREE's inversion found: whether the similarity target was ``reached``, the mask's ``pl1``,
    the trigger (``mask`` [1, H, W], ``pattern`` [3, H, W]), the similarity reached and the final ``lam``."""

    reached: bool
    pl1: float
    mask: torch.Tensor
    pattern: torch.Tensor
    similarity: Optional[float]
    lam: float

    def details(self, params: DecreeParams) -> dict:
        return {"similarity_target": params.similarity, "reached": self.reached, "similarity": self.similarity,
                "final_lam": self.lam}


def pairwise_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct pairs of normalised embeddings."""
    n = embeddings.shape[0]
    total = embeddings.sum(0)
    return ((total @ total) - (embeddings * embeddings).sum()) / (n * (n - 1))


@SCANNERS.register("decree")
class Decree(Scanner):
    name = "decree"
    paper_name = "DECREE (Feng et al., CVPR 2023)"
    Params = DecreeParams
    batch_setting = "batch_size"
    uses_labels = True  # the verdict never reads them; they only name the label the stamped images collapse onto

    def check(self, labels: int, top_k: int) -> None:
        p = self.params
        if p.steps < 1 or p.batch_size < 2 or p.patience < 1:
            raise ParError(f"decree needs steps >= 1, batch_size >= 2 and patience >= 1; got steps={p.steps}, "
                           f"batch_size={p.batch_size}, patience={p.patience}")
        if p.lr <= 0 or p.lam <= 0 or p.lam_factor <= 1 or not -1 < p.similarity < 1:
            raise ParError(f"decree needs lr > 0, lam > 0, lam_factor > 1 and a similarity target in (-1, 1); got "
                           f"lr={p.lr}, lam={p.lam}, lam_factor={p.lam_factor}, similarity={p.similarity}")

    def documented_threshold(self, encoder):
        return THRESHOLDS.get(encoder, (PL1_THRESHOLD, THRESHOLD_SOURCE))

    def scan(self, ctx: ScanContext) -> ScanResult:
        found = self.invert(ctx)
        documented, source = self.documented_threshold(ctx.encoder)
        threshold = self.threshold(ctx, documented)
        reached, pl1, mask, pattern = found.reached, found.pl1, found.mask, found.pattern
        flagged = reached and pl1 < threshold
        top_label, share = self.collapse_label(ctx, mask, pattern)
        trigger = InvertedTrigger(mask.cpu(), pattern.cpu(), "patch", float(pl1), top_label if flagged else None)
        return ScanResult(
            scanner=self.name, flagged=flagged, statistic="PL1 (mask L1 per pixel)", value=float(pl1),
            threshold=threshold, direction="below",
            threshold_source=source if ctx.threshold is None else "given by the user",
            target=top_label if flagged else None, family="patch", triggers={"patch": trigger},
            details={**found.details(self.params), "top_label": top_label, "top_label_share": share})

    def invert(self, ctx: ScanContext) -> "Collapse":
        """DECREE's inversion: the smallest mask (with its pattern) found to collapse the stamped images."""
        from tqdm import tqdm

        p, x = self.params, ctx.images
        n, _, h, w = x.shape
        batch = min(p.batch_size, n)
        generator = torch.Generator().manual_seed(ctx.seed)
        raw_mask = torch.zeros(1, 1, h, w, device=ctx.device, requires_grad=True)
        raw_pattern = torch.zeros(1, 3, h, w, device=ctx.device, requires_grad=True)
        optimiser = torch.optim.Adam([raw_mask, raw_pattern], lr=p.lr, betas=(0.5, 0.9))
        lam, met, missed = p.lam, 0, 0
        best, best_similarity = None, None
        with tqdm(total=p.steps, desc="decree", unit="step", leave=False, disable=not ctx.progress) as bar:
            for step in range(p.steps):
                rows = torch.randperm(n, generator=generator)[:batch].to(ctx.device)
                mask, pattern = torch.sigmoid(raw_mask), torch.sigmoid(raw_pattern)
                similarity = pairwise_similarity(ctx.embed((1 - mask) * x[rows] + mask * pattern))
                l1 = mask.sum()
                loss = -similarity + lam * l1
                check_finite(loss, "inverting DECREE's trigger", step)
                reached, size = float(similarity.detach()), float(l1.detach())
                if reached > p.similarity:
                    if best is None or size < best[0]:
                        best = (size, mask.detach()[0].clone(), pattern.detach()[0].clone())
                        best_similarity = reached
                    met, missed = met + 1, 0
                else:
                    met, missed = 0, missed + 1
                if met >= p.patience:
                    lam, met = lam * p.lam_factor, 0
                elif missed >= p.patience:
                    lam, missed = lam / p.lam_factor, 0
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                bar.update()
        if best is None:  # the target was never met: no trigger smaller than the whole image is known to collapse them
            return Collapse(False, 1.0, torch.sigmoid(raw_mask).detach()[0], torch.sigmoid(raw_pattern).detach()[0],
                            None, lam)
        l1, mask, pattern = best
        return Collapse(True, l1 / (h * w), mask, pattern, best_similarity, lam)

    @staticmethod
    def collapse_label(ctx: ScanContext, mask: torch.Tensor, pattern: torch.Tensor):
        """(the candidate label the zero-shot classifier gives most stamped images, the share it gets)."""
        if ctx.classifier is None or not ctx.candidates:
            return None, None
        logits = ctx.predict((1 - mask) * ctx.images + mask * pattern)[:, ctx.candidates]
        votes = torch.bincount(logits.argmax(1), minlength=len(ctx.candidates))
        best = int(votes.argmax())
        return ctx.classnames[ctx.candidates[best]], float(votes[best]) / ctx.images.shape[0]
