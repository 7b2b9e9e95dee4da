import pytest
import torch

from par import attacks
from par.errors import ParError

NAMES = ["badnet_rs", "blended"]


def _images(b=4, s=64, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_range_and_determinism(name):
    x = _images()
    a = attacks.apply(name, x, seed=1)
    b = attacks.apply(name, x, seed=1)
    c = attacks.apply(name, x, seed=2)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert torch.equal(x, _images())  # input untouched


def test_aliases_find_the_same_trigger():
    x = _images()
    assert torch.equal(attacks.apply("BadNet-Stripes", x, seed=0), attacks.apply("badnet_rs", x, seed=0))


@pytest.mark.parametrize("size,patch", [(224, 16), (336, 32), (64, 5), (32, 2)])
def test_default_patch_size_scales_with_image(size, patch):
    assert attacks.default_patch_size(size) == patch


def test_badnet_stripes_patch_geometry():
    x = torch.full((8, 3, 64, 64), 0.5)
    y = attacks.apply("badnet_rs", x, seed=0, patch_size=8)
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
    y = attacks.apply("blended", x, seed=0)
    noise = (y - 0.8 * x) / 0.2  # x' = 0.8 x + 0.2 u  =>  u = (x' - 0.8 x) / 0.2
    assert noise.min() >= -1e-5 and noise.max() <= 1 + 1e-5
    assert 0.4 < noise.mean() < 0.6  # uniform noise
    assert noise.std() > 0.25


def test_fixed_pattern_shares_the_pattern():
    x = torch.full((3, 3, 16, 16), 0.5)
    y = attacks.apply("blended", x, seed=0, fixed_pattern=True)
    assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])
    # also across images drawn one by one (poisoning, evaluation) and across seeds
    fixed = attacks.get_trigger("blended", fixed_pattern=True)
    assert torch.equal(fixed.apply_rows(x, seed=7, rows=[0, 1, 2]), y)
    assert torch.equal(attacks.apply("blended", x, seed=5, fixed_pattern=True), y)
    other = attacks.apply("blended", x, seed=0, fixed_pattern=True, pattern_seed=1)
    assert not torch.equal(other, y)
    per_image = attacks.get_trigger("blended").apply_rows(x, seed=7, rows=[0, 1, 2])
    assert not torch.equal(per_image[0], per_image[1])


def test_a_fixed_badnet_patch_is_each_images_mean_plus_one_noise_batched_or_alone():
    """BadNet's patch is the image's own per-channel mean plus N(0, 1); fixed_pattern fixes the noise, so an
    image gets the same patch in a batch (the gallery) as alone (poisoning, evaluation)."""
    x = torch.stack([torch.full((3, 16, 16), 0.2), torch.full((3, 16, 16), 0.7)])
    fixed = attacks.get_trigger("badnet", fixed_pattern=True, patch_size=4, top=0, left=0)
    batched = fixed.apply(x, torch.Generator().manual_seed(0))
    assert torch.equal(batched, fixed.apply_rows(x, seed=3, rows=[0, 1]))
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # pattern_seed 0's draw
    for image, level in zip(batched, (0.2, 0.7)):
        assert torch.allclose(image[:, :4, :4], (level + noise[0]).clamp(0, 1))


def test_unknown_trigger_lists_known_ones():
    with pytest.raises(ParError, match="known: .*badnet_rs.*blended"):
        attacks.apply("nope", _images(), seed=0)


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
        attacks.apply("badnet_rs", images, seed=0)


def test_patch_larger_than_image_is_rejected():
    with pytest.raises(ParError, match="does not fit"):
        attacks.apply("badnet_rs", _images(s=8), seed=0, patch_size=16)


def test_unknown_parameter_is_rejected():
    with pytest.raises(ParError, match="no parameter"):
        attacks.apply("blended", _images(), seed=0, patch_size=3)


ALL = ["random", "badnet_rs", "blended", "blended_rs", "tri_patt", "water_patt", "warped"]
RANDOM = ["random", "badnet_rs", "blended", "blended_rs"]
FIXED = ["tri_patt", "water_patt", "warped"]


@pytest.mark.parametrize("name", ALL)
def test_every_trigger_shape_range_determinism(name):
    x = _images(b=3, s=64)
    a = attacks.apply(name, x, seed=4)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, attacks.apply(name, x, seed=4))
    assert not torch.equal(a, x)
    other = attacks.apply(name, x, seed=5)
    if name in RANDOM:
        assert not torch.equal(a, other)
    else:
        assert torch.equal(a, other)  # a fixed pattern: the seed does not matter


def test_badnet_patch_is_mean_plus_noise_inside_patch_only():
    x = torch.full((4, 3, 224, 224), 0.3)
    y = attacks.apply("random", x, seed=0)
    changed = (y != x).any(dim=1)
    for i in range(4):
        rows, cols = changed[i].nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
        top, left = int(rows.min()), int(cols.min())
        patch = y[i, :, top:top + 16, left:left + 16]
        assert patch.std() > 0.05  # noise, not a flat square


def test_blended_stripes_weight_and_stripes():
    x = torch.full((2, 3, 32, 32), 0.5)
    y = attacks.apply("blended_rs", x, seed=0)
    p = (y - 0.97 * x) / 0.03
    assert torch.allclose(p.abs(), torch.ones_like(p), atol=1e-4)  # pattern is +-1
    assert torch.equal(y, y[:, :, :1, :].expand_as(y))  # vertical stripes


def test_blended_triangles_pixel_exact_at_224():
    """The reference's pattern file: grey 0.4 where (row mod 14) >= (col mod 14), 0.8 elsewhere."""
    x = torch.full((1, 3, 224, 224), 0.2)
    y = attacks.apply("tri_patt", x, seed=0)
    rows = torch.arange(224)[:, None] % 14
    cols = torch.arange(224)[None, :] % 14
    expected = 0.85 * 0.2 + 0.15 * torch.where(rows >= cols, 0.4, 0.8)
    assert torch.allclose(y[0, 0], expected) and torch.equal(y[0, 0], y[0, 2])
    assert y[0, 0, 13, 0] == pytest.approx(0.85 * 0.2 + 0.15 * 0.4)  # row >= col: 0.4
    assert y[0, 0, 0, 13] == pytest.approx(0.85 * 0.2 + 0.15 * 0.8)  # row < col: 0.8
    assert y[0, 0, 0, 14] == pytest.approx(0.85 * 0.2 + 0.15 * 0.4)  # next cell starts on its diagonal


def test_blended_text_changes_only_red_near_the_centre():
    x = torch.full((1, 3, 224, 224), 0.5)
    y = attacks.apply("water_patt", x, seed=0)
    assert torch.equal(y[:, 1:], x[:, 1:])
    rows, cols = (y[0, 0] != 0.5).nonzero(as_tuple=True)
    assert abs(rows.float().mean() - 114) < 4 and abs(cols.float().mean() - 110.5) < 4
    assert y[0, 0].max() == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)  # full-ink pixels: 0.5 x + 0.5 * 1


def test_wanet_field_is_fixed_and_identity_without_strength():
    x = _images(b=2, s=32)
    still = attacks.get_trigger("warped")
    still.strength = 0.0  # the algebra's identity; as a parameter, a warp that warps nothing is refused
    assert torch.allclose(still.apply(x, torch.Generator()), x, atol=1e-5)
    with pytest.raises(ParError, match="strength must be greater than 0"):
        attacks.apply("warped", x, seed=0, strength=0.0)
    a = attacks.apply("warped", x, seed=0)
    assert not torch.equal(a, attacks.apply("warped", x, seed=0, field_seed=1))
    assert (a - x).abs().max() > 0.01


def test_blended_text_matches_the_reference_geometry_at_224():
    """The reference's red text spans rows 103-125 and columns 13-208, red channel only, anti-aliased, peak 1.0."""
    pattern = attacks.apply("water_patt", torch.zeros(1, 3, 224, 224), seed=0)[0] * 2  # alpha 0.5 on black
    assert pattern[1:].abs().max() == 0
    ink = pattern[0]
    rows, cols = (ink > 0).nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (103, 125, 13, 208)
    assert ink.max() == 1.0 and ((ink > 0) & (ink < 1)).any()  # anti-aliased edges
    # the reference's font has 1,646 inked pixels; DejaVu Sans Mono's thicker strokes give 1,820
    assert len(rows) == 1820
    # scaled with the image: the same place at 64 px
    small = attacks.apply("water_patt", torch.zeros(1, 3, 64, 64), seed=0)[0, 0]
    rows, cols = (small > 0).nonzero(as_tuple=True)
    assert abs(rows.min() - 103 * 64 / 224) <= 1 and abs(cols.min() - 13 * 64 / 224) <= 1
    assert abs(cols.max() - 208 * 64 / 224) <= 2


def test_wanet_field_pinned_at_224():
    field = attacks.get_trigger("warped").field(224)
    assert field.shape == (1, 224, 224, 2)
    assert field.abs().sum().item() == pytest.approx(50400.88, rel=1e-5)
    assert field[0, 100, 100].tolist() == pytest.approx([-0.107437, -0.106894], abs=1e-5)
    identity = torch.linspace(-1, 1, 224)
    # displacement is s * noise / S with mean |noise| = 1 before interpolation: a fraction of a pixel
    assert (field[0, :, :, 0] - identity[None, :]).abs().mean().item() < 2 / 224


def test_a_patch_at_a_fixed_place_covers_exactly_that_square_and_must_fit():
    from par.attacks import get_trigger

    trigger = get_trigger("badnet_rs", patch_size=8, fixed_pattern=True, top=22, left=20)
    mask, pattern, _ = trigger.draw(torch.rand(3, 3, 32, 32), torch.Generator().manual_seed(0))
    expected = torch.zeros(32, 32)
    expected[22:30, 20:28] = 1
    assert torch.equal(mask[:, 0], expected.expand(3, 32, 32)) and torch.equal(pattern[0], pattern[2])
    with pytest.raises(ParError, match="patch at top=26 does not fit in 32x32 images"):
        get_trigger("random", patch_size=8, top=26).draw(torch.rand(1, 3, 32, 32), torch.Generator())
    with pytest.raises(ParError, match="parameter left must be at least 0"):
        get_trigger("random", left=-1)
