import math

import torch

from par.defenses.par import par_loss, par_terms


def _embeddings():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    frozen_image = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # squared distance 2 for both rows
    frozen_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # distance 0
    return image, text, frozen_image, frozen_text


def test_par_loss_matches_hand_computation():
    image, text, frozen_image, frozen_text = _embeddings()
    # logits = identity; each row's cross-entropy is log(1 + e^-1), both directions alike
    clip = math.log(1 + math.exp(-1))
    loss = par_loss(image, text, frozen_image, frozen_text, torch.tensor(1.0), tau=2.15)
    assert math.isclose(loss.item(), clip - 0.5 * (2.0 + 0.0), rel_tol=1e-6)


def test_par_loss_normalises_raw_embeddings():
    image, text, frozen_image, frozen_text = _embeddings()
    ref = par_loss(image, text, frozen_image, frozen_text, torch.tensor(1.0))
    scaled = par_loss(3 * image, 0.5 * text, 7 * frozen_image, 2 * frozen_text, torch.tensor(1.0))
    assert torch.allclose(ref, scaled)


def test_threshold_switches_the_perturb_term_off():
    image, text, frozen_image, frozen_text = _embeddings()
    clip = math.log(1 + math.exp(-1))
    below = par_loss(image, text, frozen_image, frozen_text, torch.tensor(1.0), tau=1.5)  # S_img = 2 > 1.5
    assert math.isclose(below.item(), clip, rel_tol=1e-6)
    at = par_loss(image, text, frozen_image, frozen_text, torch.tensor(1.0), tau=2.0)  # S <= tau keeps it
    assert math.isclose(at.item(), clip - 1.0, rel_tol=1e-6)


def test_logit_scale_is_a_constant_and_frozen_side_gets_no_gradient():
    torch.manual_seed(0)
    image = torch.randn(4, 8, requires_grad=True)
    frozen_image = torch.randn(4, 8, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    terms = par_terms(image, torch.randn(4, 8), frozen_image, torch.randn(4, 8), scale, tau=100.0)
    terms["loss"].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert frozen_image.grad is None and scale.grad is None
    assert set(terms) == {"loss", "clip_loss", "image_distance", "text_distance"}


def test_distance_term_pushes_embeddings_apart():
    """A descent step on the distance term alone (the loss's gradient with the term kept, less its gradient
    with the term thresholded away) moves the embeddings away from the frozen ones."""
    torch.manual_seed(0)
    frozen = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    start = frozen + 0.01 * torch.randn(8, 16)
    text = torch.randn(8, 16)

    def gradient(tau):
        image = start.clone().requires_grad_(True)
        par_loss(image, text, frozen, text, torch.tensor(1.0), tau=tau).backward()
        return image.grad

    term = gradient(2.15) - gradient(1e-12)  # at tau 1e-12 no distance is kept: the CLIP loss alone
    before = par_terms(start, text, frozen, text, 1.0)["image_distance"].item()
    after = par_terms(start - 0.5 * term, text, frozen, text, 1.0)["image_distance"].item()
    assert after > 1.05 * before  # deleting the term gives after == before, flipping its sign after < before
