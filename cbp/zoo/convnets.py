"""The small networks defined here: ResNet-20, AlexNet-BN, a tiny MobileNetV2.

Each registers its stem first and its classifier last in ``named_modules()``, so that
``cbp.prepare``'s default (first and last Conv/Linear at full precision) keeps the right ones.
The registry that builds them by name, with the torchvision and GPT models, is :mod:`cbp.zoo.models`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init for Conv/Linear weights, BN as identity, biases zero."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN; the shortcut is a 1×1 conv+BN when the shape changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016, Sec. 4.2): 3×3 stem, 3 stages of 3 blocks, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], width
        for i, stride in enumerate((1, 2, 2)):
            planes = width * 2 ** i
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                        BasicBlock(planes, planes), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    return ResNet20(num_classes, in_channels, width)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, padding: int) -> list:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_ch, eps=1e-4), nn.ReLU(inplace=True)]


def _linear_bn_relu(in_f: int, out_f: int) -> list:
    return [nn.Linear(in_f, out_f, bias=False), nn.BatchNorm1d(out_f, eps=1e-4),
            nn.ReLU(inplace=True)]


class AlexNetBN(nn.Module):
    """The paper's AlexNet with BatchNorm after every hidden layer and no dropout.

    torchvision AlexNet geometry; layers followed by BN have no bias and BN uses eps 1e-4, as in
    the authors' reference code.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 64, 11, 4, 2), pool,
            *_conv_bn_relu(64, 192, 5, 1, 2), pool,
            *_conv_bn_relu(192, 384, 3, 1, 1),
            *_conv_bn_relu(384, 256, 3, 1, 1),
            *_conv_bn_relu(256, 256, 3, 1, 1), pool)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            *_linear_bn_relu(256 * 6 * 6, 4096), *_linear_bn_relu(4096, 4096),
            nn.Linear(4096, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet_bn(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return AlexNetBN(num_classes, in_channels)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN;
    identity shortcut when the shape is kept (Sandler et al. 2018)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int):
        super().__init__()
        hidden = in_ch * expand
        layers = [] if expand == 1 else [nn.Conv2d(in_ch, hidden, 1, bias=False),
                                         nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class TinyMobileNetV2(nn.Module):
    """A MobileNetV2 for 28x28 images (stride-2 stem): 98,832 quantizable weights in 24 convs.

    The architecture where Nagel et al. (ICML 2022) found straight-through oscillations hurt most
    (depthwise layers have few weights per output). ``cbp.prepare`` quantizes every conv but the
    stem, depthwise ones included; the stem and the classifier stay float.
    """

    # (expansion, output channels, blocks, stride of the first block)
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 2))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, last_channels: int = 256):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        blocks, ch = [], 16
        for expand, out_ch, count, stride in self.SETTINGS:
            for i in range(count):
                blocks.append(InvertedResidual(ch, out_ch, stride if i == 0 else 1, expand))
                ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(ch, last_channels, 1, bias=False),
                                  nn.BatchNorm2d(last_channels), nn.ReLU6(inplace=True),
                                  nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.head(self.blocks(self.stem(x))), 1))


def mobilenetv2_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return TinyMobileNetV2(num_classes, in_channels)
