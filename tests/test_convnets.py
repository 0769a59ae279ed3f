"""The networks of cbp.zoo.convnets, layer by layer against their papers: each layer's kind,
channels, and the feature-map size it produces on a real input (sizes worked out by hand from
kernel, stride and padding), no bias before BatchNorm, in-place activations, the shortcuts, the
initialisation, and the builders' defaults and arguments."""

import pytest
import torch
import torch.nn as nn

from cbp.zoo.convnets import (
    AlexNetBN,
    BasicBlock,
    InvertedResidual,
    ResNet20,
    TinyMobileNetV2,
    alexnet_bn,
    mobilenetv2_tiny,
    resnet20,
)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def _forward_hooked(model, x, modules, hook):
    """One eval forward of ``x`` with ``hook`` on each of ``modules``, removed afterwards."""
    hooks = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()


def _trace(model, x):
    """Every leaf module's call in forward order: (module, output shape without the batch)."""
    calls = []
    _forward_hooked(model, x, [m for m in model.modules() if not list(m.children())],
                    lambda m, i, o: calls.append((m, tuple(o.shape[1:]))))
    return calls


def _kinds_and_shapes(calls):
    return [(type(m).__name__, shape) for m, shape in calls]


def _assert_bias_free_before_batchnorm(calls):
    """A bias feeding BatchNorm is cancelled by its mean subtraction: a parameter that would
    train for nothing (and, for AlexNet-BN, a key the authors' weights do not have)."""
    pairs = [(a, b) for (a, _), (b, _) in zip(calls, calls[1:])
             if isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert pairs
    for a, _ in pairs:
        assert isinstance(a, (nn.Conv2d, nn.Linear)) and a.bias is None, a


def _assert_activations_in_place(model, x):
    """Every ReLU/ReLU6 overwrites its input instead of allocating a second activation of the
    same size, as in torchvision's AlexNet, ResNets and MobileNetV2 that these networks follow:
    one activation buffer a layer, not two, in the forward's peak memory (the only difference
    an out-of-place activation would make: the values and gradients are the same)."""
    same = []
    _forward_hooked(model, x, [m for m in model.modules() if isinstance(m, _ACTIVATIONS)],
                    lambda m, i, o: same.append(o.data_ptr() == i[0].data_ptr()))
    assert same and all(same), same


def _params(model):
    return sum(p.numel() for p in model.parameters())


# -- AlexNet-BN ---------------------------------------------------------------------------------

def test_alexnet_bn_layers_as_the_paper_builds_them():
    """torchvision's AlexNet geometry with BatchNorm (eps 1e-4, the authors' reference code)
    after every hidden layer, no dropout; the builder forwards classes and input channels.

    Input 66×66: a side where every padding shows in the sizes (at 224 a stem padding of 3
    would give the same 55 as 2). Stem: (66 + 2·2 - 11)//4 + 1 = 15; max-pool 3/2: 7; conv 5
    pad 2: 7; pool: 3; three 3×3 pad 1: 3; pool: 1; adaptive average pool: 6×6.
    """
    model = alexnet_bn(num_classes=7, in_channels=2)
    x = torch.randn(1, 2, 66, 66)
    calls = _trace(model, x)
    conv = lambda c, s: [("Conv2d", (c, s, s)), ("BatchNorm2d", (c, s, s)), ("ReLU", (c, s, s))]  # noqa: E731
    fc = [("Linear", (4096,)), ("BatchNorm1d", (4096,)), ("ReLU", (4096,))]
    assert _kinds_and_shapes(calls) == (
        conv(64, 15) + [("MaxPool2d", (64, 7, 7))] + conv(192, 7) + [("MaxPool2d", (192, 3, 3))]
        + conv(384, 3) + conv(256, 3) + conv(256, 3) + [("MaxPool2d", (256, 1, 1))]
        + [("AdaptiveAvgPool2d", (256, 6, 6))] + fc + fc + [("Linear", (7,))])
    convs = [m for m, _ in calls if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (11, 4, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    pools = [m for m, _ in calls if isinstance(m, nn.MaxPool2d)]
    assert all((p.kernel_size, p.stride) == (3, 2) for p in pools)
    _assert_bias_free_before_batchnorm(calls)
    batchnorms = [m for m, _ in calls if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(batchnorms) == 7 and all(bn.eps == 1e-4 for bn in batchnorms)
    _assert_activations_in_place(model, x)
    # counted by hand: conv weights, Linear weights (+ the last one's bias), BN (gamma, beta)
    weights = (64 * 2 * 11 * 11 + 192 * 64 * 5 * 5 + 384 * 192 * 9 + 256 * 384 * 9 + 256 * 256 * 9
               + 256 * 6 * 6 * 4096 + 4096 * 4096 + 4096 * 7 + 7)
    assert _params(model) == weights + 2 * (64 + 192 + 384 + 256 + 256 + 4096 + 4096)


@pytest.mark.parametrize("build", [AlexNetBN, alexnet_bn])
def test_alexnet_bn_defaults_are_imagenets(build):
    """ImageNet: 1000 classes from RGB input."""
    model = build().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 66, 66)).shape == (1, 1000)


# -- tiny MobileNetV2 -----------------------------------------------------------------------

# (in, out, stride, expansion) of the 8 inverted residual blocks, from TinyMobileNetV2.SETTINGS
# as Sandler et al. read them (the first block of a stage strides), and the side each produces
# from the stem's 14×14 (28×28 input, stride 2): a stride-2 3×3 pad 1 conv gives (s - 1)//2 + 1.
BLOCKS = [(16, 16, 1, 1, 14), (16, 24, 2, 4, 7), (24, 24, 1, 4, 7), (24, 32, 2, 4, 4),
          (32, 32, 1, 4, 4), (32, 32, 1, 4, 4), (32, 64, 2, 4, 2), (64, 64, 1, 4, 2)]


def test_tiny_mobilenetv2_layers_as_the_paper_builds_them():
    """Stride-2 stem (28 -> 14), the blocks of BLOCKS (1×1 expand + BN + ReLU6 unless the
    expansion is 1, 3×3 depthwise + BN + ReLU6 carrying the stride, 1×1 project + BN), a 1×1
    head to 256 channels + BN + ReLU6, average pool, fc; the builder forwards its arguments."""
    model = mobilenetv2_tiny(num_classes=7, in_channels=3)
    x = torch.randn(1, 3, 28, 28)
    calls = _trace(model, x)
    expected = [("Conv2d", (16, 14, 14)), ("BatchNorm2d", (16, 14, 14)), ("ReLU6", (16, 14, 14))]
    side_in = 14
    for in_ch, out_ch, _, expand, side in BLOCKS:
        hidden = in_ch * expand
        if expand != 1:
            expected += [("Conv2d", (hidden, side_in, side_in)),
                         ("BatchNorm2d", (hidden, side_in, side_in)),
                         ("ReLU6", (hidden, side_in, side_in))]
        expected += [("Conv2d", (hidden, side, side)), ("BatchNorm2d", (hidden, side, side)),
                     ("ReLU6", (hidden, side, side)), ("Conv2d", (out_ch, side, side)),
                     ("BatchNorm2d", (out_ch, side, side))]
        side_in = side
    expected += [("Conv2d", (256, 2, 2)), ("BatchNorm2d", (256, 2, 2)), ("ReLU6", (256, 2, 2)),
                 ("AdaptiveAvgPool2d", (256, 1, 1)), ("Linear", (7,))]
    assert _kinds_and_shapes(calls) == expected
    convs = [m for m, _ in calls if isinstance(m, nn.Conv2d)]
    stem, head = convs[0], convs[-1]
    assert (stem.in_channels, stem.kernel_size, stem.stride, stem.padding) == (3, (3, 3), (2, 2),
                                                                               (1, 1))
    assert (head.in_channels, head.kernel_size) == (64, (1, 1))
    depthwise = [c for c in convs if c.groups > 1]
    assert [(c.groups, c.in_channels, c.out_channels, c.stride[0]) for c in depthwise] == [
        (i * e, i * e, i * e, s) for i, _, s, e, _ in BLOCKS]
    assert all((c.kernel_size, c.padding) == ((3, 3), (1, 1)) for c in depthwise)
    pointwise = [c for c in convs[1:] if c.groups == 1]
    assert all(c.kernel_size == (1, 1) and c.stride == (1, 1) for c in pointwise)
    _assert_bias_free_before_batchnorm(calls)
    _assert_activations_in_place(model, x)
    # the README's 98,832 quantized conv weights, plus the stem, every BN's (gamma, beta), fc
    batchnorm = sum(2 * m.num_features for m, _ in calls if isinstance(m, nn.BatchNorm2d))
    assert _params(model) == 98832 + 16 * 3 * 9 + batchnorm + 256 * 7 + 7


@pytest.mark.parametrize("build", [TinyMobileNetV2, mobilenetv2_tiny])
def test_tiny_mobilenetv2_defaults_are_fashion_mnists(build):
    """Fashion-MNIST (the demo data): 10 classes from grey 28×28 input."""
    model = build().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_inverted_residual_shortcut_only_where_the_shape_is_kept():
    """The identity shortcut is added where the stride is 1 and the channels stay (blocks 0, 2,
    4, 5, 7 of the tiny network), never where either changes (Sandler et al. 2018, Fig. 4)."""
    torch.manual_seed(0)
    model = mobilenetv2_tiny().eval()
    residual = [s == 1 and i == o for i, o, s, _, _ in BLOCKS]
    assert residual == [True, False, True, False, True, True, False, True]
    blocks = list(model.blocks)
    standalone = [InvertedResidual(8, 12, 1, 2), InvertedResidual(8, 8, 2, 2)]
    side_in = 14
    with torch.no_grad():
        for block, keeps, (in_ch, _, _, _, side) in zip(blocks, residual, BLOCKS):
            x = torch.randn(2, in_ch, side_in, side_in)
            out = block.block(x)
            assert torch.equal(block(x), x + out if keeps else out)
            side_in = side
        for block in standalone:  # stride 1 with new channels; stride 2 with the same ones
            x = torch.randn(2, 8, 6, 6)
            assert torch.equal(block.eval()(x), block.block(x))


# -- ResNet-20 ------------------------------------------------------------------------------

def _basic_block_output(block, x):
    """relu(F(x) + shortcut(x)), F = conv-BN-relu-conv-BN, from the block's own layers."""
    f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    return torch.relu(f + (x if block.downsample is None else block.downsample(x)))


def test_resnet20_blocks_and_shortcuts():
    """He et al. (2016) Sec. 4.2: 3×3 stem, three stages of 3 blocks at widths w, 2w, 4w, the
    first block of a new stage halving the side (28 -> 28, 14, 7), each block giving
    relu(F(x) + shortcut(x)); the shortcut is the identity unless the shape changes, then a
    strided 1×1 conv + BN (option B). The builder forwards classes, channels and width."""
    torch.manual_seed(0)
    model = resnet20(num_classes=7, in_channels=3, width=8)
    x = torch.randn(2, 3, 28, 28)
    calls = _trace(model, x)
    layer = lambda kind, c, s: (kind, (c, s, s))  # noqa: E731
    expected = [layer("Conv2d", 8, 28), layer("BatchNorm2d", 8, 28), layer("ReLU", 8, 28)]
    for width, side in ((8, 28), (16, 14), (32, 7)):
        for i in range(3):
            if i == 0 and width != 8:
                expected += [layer("Conv2d", width, side), layer("BatchNorm2d", width, side)]
            expected += [layer("Conv2d", width, side), layer("BatchNorm2d", width, side),
                         layer("ReLU", width, side), layer("Conv2d", width, side),
                         layer("BatchNorm2d", width, side), layer("ReLU", width, side)]
    expected += [layer("AdaptiveAvgPool2d", 32, 1), ("Linear", (7,))]
    assert _kinds_and_shapes(calls) == expected
    convs = [m for m, _ in calls if isinstance(m, nn.Conv2d)]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in shortcuts] == [
        (8, 16, (2, 2)), (16, 32, (2, 2))]
    assert all((c.kernel_size, c.padding) == ((3, 3), (1, 1)) for c in convs if c not in shortcuts)
    _assert_bias_free_before_batchnorm(calls)
    _assert_activations_in_place(model, x)
    h = torch.relu(model.bn1(model.conv1(x)))
    with torch.no_grad():
        for block in [*model.layer1, *model.layer2, *model.layer3]:
            out = block(h)
            assert torch.equal(out, _basic_block_output(block, h))
            h = out
        # the shape changes by stride alone, or by channels alone: a projection either way
        for block in (BasicBlock(8, 8, stride=2), BasicBlock(8, 16)):
            x = torch.randn(2, 8, 6, 6)
            assert block.downsample is not None
            assert torch.equal(block.eval()(x), _basic_block_output(block, x))


@pytest.mark.parametrize("build", [ResNet20, resnet20])
def test_resnet20_defaults_are_the_demos(build):
    """The demo: 10 Fashion-MNIST classes from grey input, the paper's width 16."""
    model = build().eval()
    assert model.conv1.out_channels == 16 and model.fc.in_features == 64
    with torch.no_grad():
        assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_he_initialisation():
    """Kaiming normal with fan_out for every Conv/Linear weight (std sqrt(2 / fan_out), the
    torchvision ResNet init), biases zero, BN the identity."""
    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_channels=1)
    # fan_in and fan_out differ here: 16*9 against 32*9, and 64 against 10
    for layer, fan_out in ((model.layer2[0].conv1, 32 * 9), (model.fc, 10)):
        std = layer.weight.std().item()
        assert abs(std / (2 / fan_out) ** 0.5 - 1) < 0.1, (layer, std)
    assert torch.equal(model.fc.bias, torch.zeros(10))
    for m in (mobilenetv2_tiny(), model):
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
