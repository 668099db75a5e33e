"""VGG-style plain deep CNN (Simonyan & Zisserman 2014): 3x3 convolutions, max pools, MLP head.

All layers of the body live in ``features`` (an ``nn.Sequential``), the head in ``classifier``,
so the body is a pure chain of units.
"""

from __future__ import annotations

from torch import Tensor, nn

_BASE_WIDTHS = (64, 128, 256, 512, 512)
_CONVS_PER_STAGE = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}

CfgEntry = int | str


def vgg_cfg(depth: int = 16, width: int = 64) -> list[CfgEntry]:
    """The layer list of VGG-``depth``: channel widths and ``"M"`` for a 2x2 max pool.

    ``width`` is the channel count of the first stage (64 in the paper); later stages scale with it.
    """
    if depth not in _CONVS_PER_STAGE:
        raise ValueError(f"vgg depth must be one of {sorted(_CONVS_PER_STAGE)}, got {depth!r}")
    cfg: list[CfgEntry] = []
    for base, convs in zip(_BASE_WIDTHS, _CONVS_PER_STAGE[depth], strict=True):
        cfg += [base * width // 64] * convs + ["M"]
    return cfg


def _make_features(cfg: list[CfgEntry], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for entry in cfg:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, int(entry), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(entry)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(entry)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """``features`` -> adaptive average pool to ``pool_size`` x ``pool_size`` -> ``classifier``."""

    def __init__(
        self,
        cfg: list[CfgEntry],
        num_classes: int,
        in_channels: int,
        hidden: int,
        pool_size: int,
        dropout: float,
        batch_norm: bool,
    ) -> None:
        super().__init__()
        out_channels = [c for c in cfg if c != "M"][-1]
        self.features = _make_features(cfg, in_channels, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(out_channels) * pool_size * pool_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: images [B, C, H, W] -> class logits [B, num_classes]."""
        return self.classifier(self.avgpool(self.features(x)))


def vgg(
    depth: int = 16,
    width: int = 64,
    num_classes: int = 1000,
    in_channels: int = 3,
    hidden: int = 4096,
    pool_size: int = 7,
    dropout: float = 0.5,
    batch_norm: bool = False,
    cfg: list[CfgEntry] | None = None,
) -> VGG:
    """VGG-``depth`` (11, 13, 16 or 19) with first-stage ``width`` channels.

    ``cfg`` (widths and ``"M"`` pools), when given, replaces ``depth`` and ``width``.
    The defaults are VGG-16 for 224x224 ImageNet images.
    """
    layers = list(cfg) if cfg is not None else vgg_cfg(depth, width)
    return VGG(layers, num_classes, in_channels, hidden, pool_size, dropout, batch_norm)
