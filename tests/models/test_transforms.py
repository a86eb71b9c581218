"""Batch transforms as properties: normalisation statistics, flips are involutions, crops keep shape."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlearn.models.transforms import (
    BatchTransform,
    channel_stats,
    hflip,
    normalize,
    random_crop,
    random_hflip,
    to_float,
)


def images(n: int = 64, channels: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, side, side), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def test_normalisation_gives_mean_zero_std_one_on_its_own_data():
    batch = images()
    mean, std = channel_stats(batch)
    x = BatchTransform(mean, std)(batch)
    per_channel = x.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(
        per_channel.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        per_channel.std(dim=1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_batch_transform_equals_the_formula():
    batch = images(4, 2)
    out = BatchTransform([0.25, 0.5], [0.5, 0.125])(batch)
    x = batch.float() / 255
    expected = torch.stack([(x[:, 0] - 0.25) / 0.5, (x[:, 1] - 0.5) / 0.125], dim=1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(x, [0.25, 0.5], [0.5, 0.125]), expected)


def test_transform_does_not_modify_float_input():
    x = to_float(images(4))
    kept = x.clone()
    BatchTransform([0.5] * 3, [0.2] * 3)(x)
    assert torch.equal(x, kept)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9))
def test_flip_twice_is_identity(seed: int, n: int):
    batch = torch.randn(n, 2, 5, 7)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert torch.equal(hflip(hflip(batch, mask), mask), batch)
    same_twice = random_hflip(
        random_hflip(batch, torch.Generator().manual_seed(seed)), torch.Generator().manual_seed(seed)
    )
    assert torch.equal(same_twice, batch)


def test_flip_mirrors_exactly_the_masked_images():
    batch = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = hflip(batch, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert torch.equal(out[1], batch[1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), padding=st.integers(0, 4))
def test_crop_keeps_shape_and_takes_a_shifted_window(seed: int, padding: int):
    batch = torch.randn(6, 3, 8, 8)
    out = random_crop(batch, torch.Generator().manual_seed(seed), padding)
    assert out.shape == batch.shape
    # Recompute each image by brute force: which offset of the zero-padded image gives this crop?
    padded = torch.nn.functional.pad(batch, (padding,) * 4)
    for i in range(len(batch)):
        windows = [
            padded[i, :, top : top + 8, left : left + 8]
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
        ]
        assert any(torch.equal(out[i], w) for w in windows)


def test_crop_offsets_are_uniform_over_the_window():
    # 3x3 single-pixel images with padding 1: the centre pixel lands at one of 9 places, each ~1/9.
    batch = torch.zeros(9000, 1, 3, 3)
    batch[:, :, 1, 1] = 1.0
    out = random_crop(batch, torch.Generator().manual_seed(0), 1)
    where = out.view(9000, 9).argmax(dim=1)
    counts = torch.bincount(where, minlength=9).float() / 9000
    torch.testing.assert_close(counts, torch.full((9,), 1 / 9), atol=0.02, rtol=0)


def test_augmentation_is_reproducible_from_the_generator_state():
    transform = BatchTransform([0.5] * 3, [0.25] * 3, crop_padding=2, flip=True)
    batch = images(16)
    a = transform(batch, torch.Generator().manual_seed(3))
    b = transform(batch, torch.Generator().manual_seed(3))
    c = transform(batch, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
