"""``decree``: DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023), label-free.

A backdoored image encoder maps every image carrying its trigger to nearly the same embedding, so a
small trigger that makes the shadow images' embeddings collapse exists only when a backdoor does.
DECREE learns a mask ``m`` (``1 x H x W``) and a pattern ``p`` (``3 x H x W``), both through a sigmoid,
minimising ``-(mean pairwise cosine similarity of the stamped images' embeddings) + lam * ||m||_1`` on
batches of the shadow images with Adam. ``lam`` starts at 1e-3 and is multiplied by 5 after
``patience`` consecutive steps that meet the similarity target and divided by 5 after as many that
miss it; the smallest mask that met the target is kept. The statistic is
``PL1 = ||m||_1 / (H * W)``; the encoder is flagged when it is below the threshold. DECREE says
whether an encoder is backdoored, not toward which label (it never sees one).

Settings are the paper's (similarity target 0.99, lr 0.5, batch 32): the micro world's clean models
reach the 0.99 target within 300 steps at 32 px, so no lower target was needed, and lr 0.5 does not
diverge there. The threshold 0.1 is the cut-off DECREE's reproductions use on 224-px encoders. On the
micro world it flags every model: there PL1 is 0.035-0.036 for the poisoned micro model against
0.045-0.068 for four clean ones (the micro encoders collapse under small masks whether or not they
are backdoored); the statistic ranks them, but a tiny encoder needs its own threshold (``threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from par.errors import ParError
from par.scan.base import SCANNERS, InvertedTrigger, ScanContext, ScannerParams, ScanResult, Scanner, check_finite

PL1_THRESHOLD = 0.1
THRESHOLD_SOURCE = "the PL1 cut-off of DECREE's reproductions on 224-px encoders"


@dataclass
class DecreeParams(ScannerParams):
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.5  # the paper's
    lam: float = 1e-3  # initial weight of ||m||_1
    lam_factor: float = 5.0  # lam is multiplied or divided by this ...
    patience: int = 5  # ... after this many consecutive steps that meet (or miss) the similarity target
    similarity: float = 0.99  # the target: mean pairwise cosine similarity of the stamped embeddings


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

    def check(self, labels: int, top_k: int) -> None:
        p = self.params
        if p.steps < 1 or p.batch_size < 2 or p.patience < 1:
            raise ParError(f"decree needs steps >= 1, batch_size >= 2 and patience >= 1; got steps={p.steps}, "
                           f"batch_size={p.batch_size}, patience={p.patience}")
        if p.lr <= 0 or p.lam <= 0 or p.lam_factor <= 1 or not -1 < p.similarity < 1:
            raise ParError(f"decree needs lr > 0, lam > 0, lam_factor > 1 and a similarity target in (-1, 1); got "
                           f"lr={p.lr}, lam={p.lam}, lam_factor={p.lam_factor}, similarity={p.similarity}")

    def scan(self, ctx: ScanContext) -> ScanResult:
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
        reached = best is not None
        if reached:
            l1, mask, pattern = best
            pl1 = l1 / (h * w)
        else:  # the target was never met: no trigger smaller than the whole image is known to collapse them
            mask, pattern = torch.sigmoid(raw_mask).detach()[0], torch.sigmoid(raw_pattern).detach()[0]
            pl1 = 1.0
        threshold = self.threshold(ctx, PL1_THRESHOLD)
        flagged = reached and pl1 < threshold
        trigger = InvertedTrigger(mask.cpu(), pattern.cpu(), "patch", float(pl1))
        return ScanResult(
            scanner=self.name, flagged=flagged, statistic="PL1 (mask L1 per pixel)", value=float(pl1),
            threshold=threshold, direction="below",
            threshold_source=THRESHOLD_SOURCE if ctx.threshold is None else "given by the user",
            target=None, family="patch", triggers={"patch": trigger},
            details={"similarity_target": p.similarity, "reached": reached, "similarity": best_similarity,
                     "final_lam": lam})
