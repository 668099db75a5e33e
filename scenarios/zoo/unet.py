"""U-Net (Ronneberger et al. 2015): an encoder-decoder with long skip connections by concatenation.

Blocks are separate submodules: ``inc``, ``down1`` .. ``down{depth}`` (encoder), ``up1`` ..
``up{depth}`` (decoder; each takes the upsampled features and the matching encoder output) and
``outc``, so the graph is a DAG with long edges, not a chain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice; spatial size unchanged."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max pool (halves H and W), then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """2x2 transposed convolution (doubles H and W), concatenation with the skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``x``: [B, in, H, W], ``skip``: [B, out, 2H, 2W] -> [B, out, 2H, 2W]."""
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Per-pixel classifier: [B, in_channels, H, W] -> logits [B, num_classes, H, W]."""

    def __init__(self, in_channels: int, num_classes: int, base: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        for i in range(depth):
            self.add_module(f"down{i + 1}", Down(widths[i], widths[i + 1]))
        for i in range(depth):
            self.add_module(f"up{i + 1}", Up(widths[depth - i], widths[depth - i - 1]))
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """H and W must be divisible by 2**depth."""
        skips = [self.inc(x)]
        for i in range(self.depth):
            skips.append(getattr(self, f"down{i + 1}")(skips[-1]))
        y = skips.pop()
        for i in range(self.depth):
            y = getattr(self, f"up{i + 1}")(y, skips.pop())
        return self.outc(y)


def unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4) -> UNet:
    """U-Net with ``depth`` down/up levels and ``base`` channels at full resolution (64 in the paper)."""
    if depth < 1:
        raise ValueError(f"unet depth must be at least 1, got {depth!r}")
    return UNet(in_channels, num_classes, base, depth)
