"""Input pipeline as batched tensor operations (no torchvision): scale, normalise, random crop, flip.

Every function takes a whole batch ``(N, C, H, W)`` and, where it is random, an explicit
``torch.Generator``, so the same generator state gives the same augmented batch (the trainer saves that
state in its checkpoints). The augmentations are the standard CIFAR-10 ones of He et al. (2016, section
4.2): pad 4 pixels on each side, take a random 32x32 crop, flip horizontally with probability 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BatchTransform", "channel_stats", "hflip", "normalize", "random_crop", "random_hflip", "to_float"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [0, 1]; float input is returned as float32 unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of ``images`` scaled by :func:`to_float`."""
    x = to_float(images).transpose(0, 1).reshape(images.shape[1], -1).double()
    return x.mean(dim=1).tolist(), x.std(dim=1, unbiased=False).tolist()


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean[c]) / std[c]`` per channel ``c``; returns a new tensor."""
    channels = batch.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"normalize: {channels} channels but {len(mean)} means and {len(std)} stds")
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize: every std must be > 0, got {list(std)}")
    mean_t = torch.tensor(mean, dtype=batch.dtype).view(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=batch.dtype).view(1, channels, 1, 1)
    return (batch - mean_t) / std_t


def hflip(batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images where ``mask`` (bool, shape (N,)) is true, left to right."""
    return torch.where(mask.view(-1, 1, 1, 1), batch.flip(3), batch)


def random_hflip(batch: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image independently with probability ``p``."""
    mask = torch.rand(batch.shape[0], generator=generator) < p
    return hflip(batch, mask)


def random_crop(batch: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and cut a random crop of the original size.

    One offset pair per image, drawn uniformly from ``{0, ..., 2 * padding}``; the output has the input's
    shape. The crop is one advanced-indexing gather, not a Python loop over the batch.
    """
    if padding == 0:
        return batch
    n, c, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (padding, padding, padding, padding))  # (N, C, H+2p, W+2p)
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (top.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)  # (N, 1, H, 1)
    cols = (left.view(n, 1) + torch.arange(w)).view(n, 1, 1, w)  # (N, 1, 1, W)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


class BatchTransform:
    """What the trainer applies to every batch: scale to [0, 1], normalise, then (training only) augment.

    Args:
        mean, std: per-channel statistics of the training images after scaling to [0, 1].
        crop_padding: random-crop padding (0 disables the crop).
        flip: random horizontal flips.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0, flip: bool = False
    ) -> None:
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"BatchTransform: need one positive std per mean, got {self.mean}, {self.std}")
        channels = len(self.mean)
        # x' = x * scale + shift  ==  (x - mean) / std, precomputed once per run
        self._scale = (1.0 / torch.tensor(self.std, dtype=torch.float32)).view(1, channels, 1, 1)
        self._shift = (-torch.tensor(self.mean, dtype=torch.float32) / torch.tensor(self.std)).view(
            1, channels, 1, 1
        )
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_float(images)
        if x.data_ptr() == images.data_ptr():  # float input: do not overwrite the caller's tensor
            x = x.clone()
        x = x.mul_(self._scale).add_(self._shift)
        if generator is not None:
            if self.crop_padding:
                x = random_crop(x, generator, self.crop_padding)
            if self.flip:
                x = random_hflip(x, generator)
        return x

    def __repr__(self) -> str:
        return f"BatchTransform(crop_padding={self.crop_padding}, flip={self.flip})"
