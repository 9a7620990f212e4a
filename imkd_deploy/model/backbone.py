"""Image trunk: a small self-contained ResNet (no torchvision) and a top-down FPN.

The FPN returns ONE feature map at ``cfg.downsample`` stride, which is what the depth net
and BEVPool consume (BEVDepth/CRN use a single stride-16 map too).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from imkd_deploy.config import ModelConfig


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + identity, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # stride on the 3x3 (the "ResNet v1.5" layout torchvision and mmdet use)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + identity, inplace=True)


# name -> (block, blocks per stage)
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet_tiny": (BasicBlock, (1, 1, 1, 1)),
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """Stem (stride 4) + four stages at strides 4, 8, 16, 32; returns all four maps."""

    def __init__(self, arch: str, width: int):
        super().__init__()
        block, layers = ARCHS[arch]
        self.stem = nn.Sequential(conv_bn_relu(3, width, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        self.out_channels: list[int] = []
        for i, n in enumerate(layers):
            w = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
            self.out_channels.append(cin)
        self.stages = nn.ModuleList(stages)
        self.strides = (4, 8, 16, 32)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class FPN(nn.Module):
    """Top-down merge of the stages at stride >= ``out_stride``, one output at ``out_stride``."""

    def __init__(self, in_channels: list[int], strides: tuple[int, ...], out_stride: int, channels: int):
        super().__init__()
        if out_stride not in strides:
            raise ValueError(f"FPN output stride {out_stride} must be one of the trunk strides {strides}")
        self.first = strides.index(out_stride)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels[self.first:])
        self.out = conv_bn_relu(channels, channels, 3)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        feats = feats[self.first:]
        y = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            # size= (not scale 2) so odd stride-32 maps (H/16 odd) still line up
            y = lat(f) + F.interpolate(y, size=f.shape[-2:], mode="nearest")
        return self.out(y)


class ImageEncoder(nn.Module):
    """ResNet + FPN: (B*N, 3, H, W) -> (B*N, fpn_channels, H/ds, W/ds)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.trunk = ResNet(cfg.backbone, cfg.backbone_width)
        self.fpn = FPN(self.trunk.out_channels, self.trunk.strides, cfg.downsample, cfg.fpn_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fpn(self.trunk(images))
