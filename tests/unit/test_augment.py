"""Batched augmentation: shapes, dtypes, determinism, and that each op does what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter, ImageOps

from semiprune_core.errors import ConfigError
from semiprune_core.training import augment as A


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n=16, c=1, size=12, *, dtype=torch.uint8, seed=0, lo=0, hi=256) -> torch.Tensor:
    x = torch.randint(lo, hi, (n, c, size, size), generator=gen(seed), dtype=torch.uint8)
    return x if dtype == torch.uint8 else x.to(dtype) / 255.0


VIEW_FNS = {
    "hflip": lambda x, g: A.hflip(x, g),
    "pad_crop": lambda x, g: A.pad_crop(x, g, padding=2),
    "pad_crop_zeros": lambda x, g: A.pad_crop(x, g, padding=2, mode="zeros"),
    "cutout": lambda x, g: A.cutout(x, g, size=(2, 5)),
    "randaugment": lambda x, g: A.randaugment(x, g),
    "weak": lambda x, g: A.apply_view(x, "weak", g),
    "strong": lambda x, g: A.apply_view(x, "strong", g),
    "none": lambda x, g: A.apply_view(x, "none", g),
}


@pytest.mark.parametrize("name", VIEW_FNS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_dtype_range_and_determinism(name, channels, dtype):
    x = images(c=channels, dtype=dtype)
    a = VIEW_FNS[name](x, gen(3))
    b = VIEW_FNS[name](x, gen(3))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    if dtype == torch.float32:
        assert a.min() >= 0 and a.max() <= 1
    if name != "none":
        assert not torch.equal(VIEW_FNS[name](x, gen(4)), a) or name == "hflip"


def test_input_is_not_modified():
    x = images(c=3)
    before = x.clone()
    for fn in VIEW_FNS.values():
        fn(x, gen(1))
    assert torch.equal(x, before)


def test_hflip_flips_exactly_the_chosen_samples():
    x = images(n=64)
    out = A.hflip(x, gen(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)  # every sample is either mirrored or untouched, never both
    assert 10 < flipped.sum() < 54
    assert torch.equal(A.hflip(x, gen(0), p=1.0), x.flip(-1))
    assert torch.equal(A.hflip(x, gen(0), p=0.0), x)


def _find_shift(out: torch.Tensor, padded: torch.Tensor, pad: int, size: int) -> tuple[int, int] | None:
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(out, padded[:, dy : dy + size, dx : dx + size]):
                return dy - pad, dx - pad
    return None


@pytest.mark.parametrize("mode,torch_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_pad_crop_is_a_translation_of_the_padded_image(mode, torch_mode):
    """Each output equals torchvision's RandomCrop(size, padding) result for some offset."""
    x = images(n=32, c=3, size=10)
    out = A.pad_crop(x, gen(0), padding=3, mode=mode)
    padded = F.pad(x.float(), (3, 3, 3, 3), mode=torch_mode).to(torch.uint8)
    shifts = [_find_shift(o, p, 3, 10) for o, p in zip(out, padded)]
    assert None not in shifts
    assert len(set(shifts)) > 5  # offsets really vary per sample


@settings(max_examples=20, deadline=None)
@given(size=st.integers(4, 20), pad=st.integers(1, 3), channels=st.sampled_from([1, 3]), seed=st.integers(0, 10**6))
def test_pad_crop_reflect_matches_pad_then_crop(size, pad, channels, seed):
    x = images(n=4, c=channels, size=size, seed=seed % 1000)
    out = A.pad_crop(x, gen(seed), padding=pad)
    padded = F.pad(x.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    assert all(_find_shift(o, p, pad, size) is not None for o, p in zip(out, padded))


def test_pad_crop_zero_padding_is_identity():
    x = images()
    assert torch.equal(A.pad_crop(x, gen(), padding=0), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_cutout_fills_one_square_per_sample(channels):
    x = images(n=64, c=channels, size=16, lo=100, hi=256)  # no pixel equals the fill
    out = A.cutout(x, gen(0), size=5, fill=0)
    changed = out != x
    assert torch.all(out[changed] == 0)
    mask = changed.any(1)  # (B, H, W)
    assert torch.equal(changed, mask[:, None].expand_as(changed))  # same square in every channel
    for m in mask:
        rows, cols = m.any(1), m.any(0)
        assert torch.equal(m, rows[:, None] & cols[None, :])  # a rectangle ...
        r, c = rows.nonzero()[:, 0], cols.nonzero()[:, 0]
        assert 1 <= len(r) <= 5 and 1 <= len(c) <= 5  # ... of at most 5x5 (clipped at the border)
        assert torch.equal(r, torch.arange(r[0], r[-1] + 1)) and torch.equal(c, torch.arange(c[0], c[-1] + 1))
    assert (mask.sum((1, 2)) == 25).float().mean() > 0.3  # most squares are not clipped


def test_cutout_default_fill_is_mid_grey():
    x = images(lo=200, hi=256)
    assert set(A.cutout(x, gen(), size=4)[A.cutout(x, gen(), size=4) != x].tolist()) == {127}
    xf = images(lo=200, hi=256, dtype=torch.float32)
    assert set(A.cutout(xf, gen(), size=4)[A.cutout(xf, gen(), size=4) != xf].tolist()) == {0.5}


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_view_changes_most_images(channels):
    x = images(n=64, c=channels, size=28)
    out = A.strong_view(x, gen(0))
    differs = (out != x).flatten(1).any(1)
    assert differs.float().mean() > 0.9


@pytest.mark.parametrize("op", A.DEFAULT_OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_randaugment_op_runs_alone(op, channels):
    x = images(n=20, c=channels, size=14)
    out = A.randaugment(x, gen(0), num_ops=1, ops=(op,))
    assert out.shape == x.shape and out.dtype == torch.uint8
    if op == "identity" or (op == "color" and channels == 1):
        assert torch.equal(out, x)


def test_randaugment_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown"):
        A.randaugment(images(), gen(), ops=("rotate", "wobble"))


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img[0].numpy())


def test_colour_ops_match_pil():
    x = images(n=6, size=16, seed=5)
    x[:3] //= 3  # low-contrast images so equalize has work to do
    xf = x.float()
    one = torch.ones(len(x))

    def pil(fn):
        return torch.stack([torch.from_numpy(np.array(fn(_pil(i)))) for i in x])[:, None]

    assert torch.equal(A._color_op("equalize", xf, one).to(torch.uint8), pil(ImageOps.equalize))
    assert torch.equal(A._color_op("solarize", xf, one * 0.5).to(torch.uint8), pil(lambda im: ImageOps.solarize(im, 128)))
    assert torch.equal(A._color_op("posterize", xf, one * 0.0).to(torch.uint8), pil(lambda im: ImageOps.posterize(im, 4)))
    auto = A._color_op("autocontrast", xf, one)
    ref = pil(ImageOps.autocontrast)
    assert (auto.round() - ref.float()).abs().max() <= 1  # PIL rounds its lookup table differently


@pytest.mark.parametrize("size", [16, 28, 3])
def test_sharpness_blends_with_pils_smooth_filter(size):
    """At factor 0 the sharpness op is the image under PIL's SMOOTH filter, border kept, to the byte."""
    x = images(n=8, size=size, seed=7)
    smooth = torch.stack([torch.from_numpy(np.array(_pil(i).filter(ImageFilter.SMOOTH))) for i in x])[:, None]
    assert torch.equal(A._sharpness(x.float(), torch.zeros(len(x))).to(torch.uint8), smooth)
    assert torch.equal(A._sharpness(x.float(), torch.ones(len(x))), x.float())  # factor 1: the image


def test_unknown_view_is_a_config_error():
    with pytest.raises(ConfigError, match="weak"):
        A.apply_view(images(), "medium", gen())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="C, H, W"):
        A.hflip(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), gen())


@pytest.mark.parametrize("mode,torch_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_weak_view_is_a_translation_of_the_image_or_its_mirror(mode, torch_mode):
    x = images(n=48, c=3, size=10)
    out = A.pad_crop(x, gen(0), padding=2, mode=mode, flip_p=0.5)
    padded = F.pad(x.float(), (2,) * 4, mode=torch_mode).to(torch.uint8)
    mirrored = F.pad(x.flip(-1).float(), (2,) * 4, mode=torch_mode).to(torch.uint8)
    plain = [_find_shift(o, p, 2, 10) is not None for o, p in zip(out, padded)]
    flipped = [_find_shift(o, p, 2, 10) is not None for o, p in zip(out, mirrored)]
    assert all(a or b for a, b in zip(plain, flipped))
    assert 5 < sum(flipped) and 5 < sum(plain)
    if mode == "reflect":  # the weak view is flip + reflect-pad-and-crop
        weak = A.weak_view(x, gen(0), padding=2)
        assert all(_find_shift(o, p, 2, 10) is not None or _find_shift(o, q, 2, 10) is not None
                   for o, p, q in zip(weak, padded, mirrored))


@pytest.mark.parametrize("n,h,w", [(265, 28, 28), (300, 32, 32), (7, 9, 5), (1, 2, 2)])
def test_the_warps_sampling_grid_is_affine_grids(n, h, w):
    theta = torch.randn(n, 2, 3, generator=gen(n))
    assert torch.equal(A._affine_grid(theta, h, w), F.affine_grid(theta, [n, 1, h, w], align_corners=False))
