"""Small residual networks for 32x32 images (CIFAR-10): ResNet-8, -14, -20 of He et al.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: a 3x3
convolution with 16 filters, then three stages of ``n`` basic blocks on maps of 32x32, 16x16 and 8x8 with
16, 32 and 64 filters, global average pooling and a linear classifier; depth ``6n + 2``. Each basic block is
``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

Where we differ: the shortcut between stages is a 1x1 strided convolution with batch norm (the paper's
option B) rather than zero-padding (option A); it adds a few thousand parameters and is simpler to read.
``width`` scales every stage (``width=2`` doubles the filters). Tuning: SGD with momentum 0.9, lr 0.1,
weight decay 5e-4, random crop (padding 4) and flips reach ~91% (ResNet-20) after 160+ epochs on a GPU;
on two CPU cores a few epochs of ResNet-8 give about 60-70%.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "ResNet", "resnet_depth_blocks"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_depth_blocks(depth: int) -> int:
    """Blocks per stage ``n`` for a CIFAR ResNet of ``depth = 6n + 2`` layers."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    return (depth - 2) // 6


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2``.

    Args:
        depth: 8, 14, 20, 32, 44, 56, ...
        in_channels: 3 for colour images.
        num_classes: output logits.
        width: filters of the first stage (16 in the paper); the later stages have 2x and 4x.
    """

    def __init__(
        self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, *, width: int = 16
    ) -> None:
        super().__init__()
        blocks = resnet_depth_blocks(depth)
        self.depth = depth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
