import pytest
import torch

from par import triggers
from par.errors import ParError

NAMES = ["badnet_rs", "blended"]


def _images(b=4, s=64, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_determinism(name):
    x = _images()
    a = triggers.apply(name, x, seed=1)
    b = triggers.apply(name, x, seed=1)
    c = triggers.apply(name, x, seed=2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert torch.equal(x, _images())  # input untouched


def test_aliases_find_the_same_trigger():
    x = _images()
    assert torch.equal(triggers.apply("BadNet-Stripes", x, seed=0), triggers.apply("badnet_rs", x, seed=0))


@pytest.mark.parametrize("size,patch", [(224, 16), (336, 32), (64, 5), (32, 2)])
def test_default_patch_size_scales_with_image(size, patch):
    assert triggers.default_patch_size(size) == patch


def test_badnet_stripes_patch_geometry():
    x = torch.full((8, 3, 64, 64), 0.5)
    y = triggers.apply("badnet_rs", x, seed=0, patch_size=8)
    changed = (y != x).any(dim=1)  # [B, H, W]
    for i in range(8):
        rows, cols = changed[i].nonzero(as_tuple=True)
        # the patch is an 8x8 square inside the image; everything else is untouched
        assert rows.max() - rows.min() + 1 == 8 and cols.max() - cols.min() + 1 == 8
        top, left = rows.min(), cols.min()
        patch = y[i, :, top:top + 8, left:left + 8]
        assert set(patch.unique().tolist()) <= {0.0, 1.0}
        # 1-px vertical stripes: every column is constant per channel
        assert torch.equal(patch, patch[:, :1, :].expand_as(patch))
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[top:top + 8, left:left + 8] = False
        assert torch.equal(y[i][:, outside], x[i][:, outside])
    # locations differ between images
    assert len({tuple(changed[i].nonzero()[0].tolist()) for i in range(8)}) > 1


def test_blended_weight_recovered_from_constant_image():
    x = torch.full((2, 3, 32, 32), 0.5)
    y = triggers.apply("blended", x, seed=0)
    noise = (y - 0.8 * x) / 0.2  # x' = 0.8 x + 0.2 u  =>  u = (x' - 0.8 x) / 0.2
    assert noise.min() >= -1e-5 and noise.max() <= 1 + 1e-5
    assert 0.4 < noise.mean() < 0.6  # uniform noise
    assert noise.std() > 0.25


def test_fixed_pattern_shares_the_pattern():
    x = torch.full((3, 3, 16, 16), 0.5)
    y = triggers.apply("blended", x, seed=0, fixed_pattern=True)
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])


def test_unknown_trigger_lists_known_ones():
    with pytest.raises(ParError, match="known: .*badnet_rs.*blended"):
        triggers.apply("nope", _images(), seed=0)


@pytest.mark.parametrize(
    "images,match",
    [
        (torch.rand(3, 32, 32), "shape"),
        (torch.rand(1, 1, 32, 32), "shape"),
        (torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises(ParError, match=match):
        triggers.apply("badnet_rs", images, seed=0)


def test_patch_larger_than_image_is_rejected():
    with pytest.raises(ParError, match="does not fit"):
        triggers.apply("badnet_rs", _images(s=8), seed=0, patch_size=16)


def test_unknown_parameter_is_rejected():
    with pytest.raises(ParError, match="no parameter"):
        triggers.apply("blended", _images(), seed=0, patch_size=3)
