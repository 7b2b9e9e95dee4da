import pytest
import torch
from PIL import Image

from par import attacks, models
from par.attacks.badclip import BadCLIPConfig, make_badclip_patch, optimise_patch, paste_centre
from par.errors import ParError


def test_optimiser_lowers_its_own_loss():
    torch.manual_seed(0)
    model = models.create_model("par-micro-vit").eval().requires_grad_(False)
    mean, std = models.image_mean_std(model)
    images = torch.rand(16, 3, 32, 32)
    targets = torch.rand(8, 3, 32, 32)
    text_target = torch.randn(model.text_projection.shape[1])
    _, losses = optimise_patch(model, images, targets, text_target, patch_size=8, steps=25, lr=0.05,
                               batch_size=16, mean=mean, std=std)
    assert losses[-1] < losses[0] - 0.01


def test_paste_centre_geometry():
    x = torch.zeros(2, 3, 10, 10)
    y = paste_centre(x, torch.ones(1, 3, 4, 4))
    assert y[:, :, 3:7, 3:7].eq(1).all() and y.sum() == 2 * 3 * 16


def test_patch_file_round_trip_through_the_trigger(micro_world, tmp_path):
    ckpt = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "clean.pt")
    out = make_badclip_patch(BadCLIPConfig(checkpoint=str(ckpt), model="par-micro-vit",
                                           data=str(micro_world / "train.csv"), label="banana",
                                           out=str(tmp_path / "patch.png"), patch_size=6, steps=3, progress=False))
    assert Image.open(out).size == (6, 6)
    with pytest.raises(ParError, match="--out must be a .png file"):  # before the optimisation, not at its save
        make_badclip_patch(BadCLIPConfig(checkpoint=str(ckpt), model="par-micro-vit", data=str(micro_world / "train.csv"),
                                         label="banana", out=str(tmp_path / "patch"), steps=3, progress=False))
    x = torch.full((2, 3, 32, 32), 0.5)
    y = attacks.apply("badclip", x, seed=0, patch=str(out), patch_size=6)
    changed = (y != x).any(dim=1)
    rows, cols = changed.nonzero(as_tuple=True)[1:]
    assert rows.min() >= 13 and rows.max() <= 18 and cols.min() >= 13 and cols.max() <= 18
    with pytest.raises(ParError, match="needs its optimised patch"):
        attacks.apply("badclip", x, seed=0)


def test_the_prepared_patch_is_optimised_at_the_size_it_is_planted(micro_world, tmp_path):
    ckpt = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "clean.pt")
    context = attacks.AttackContext(label="banana", model="par-micro-vit", clean_data=str(micro_world / "train.csv"),
                                    templates=str(micro_world / "templates.txt"), workdir=tmp_path,
                                    clean_checkpoint=lambda: (ckpt, "clean"), settings={"steps": 1})
    patch = attacks.get_trigger("badclip", patch_size=8).prepare(context)["patch"]
    assert Image.open(patch).size == (8, 8)  # not the default 2 px for 32-px images, blurred up to 8
