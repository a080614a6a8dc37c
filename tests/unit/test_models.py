"""Model registry: names, errors, output and feature shapes, seeded initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semiprune_core.errors import ConfigError
from semiprune_core.models import Classifier, create_model, list_models, register_model
from semiprune_core.models.fastcnn import SpaceToDepth
from semiprune_core.training.engine import cpu_has_native_bf16


def test_list_models_names_the_built_in_models():
    assert {"fastcnn", "fastcnn_s", "fastcnn_l", "resnet18_cifar", "mlp"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_is_a_config_error_listing_known_names():
    with pytest.raises(ConfigError) as err:
        create_model("resnet9000", in_channels=1, num_classes=10, image_size=28)
    message = str(err.value)
    assert "resnet9000" in message and "fastcnn" in message and "resnet18_cifar" in message
    assert "\n" not in message


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("mlp", in_channels=bad, num_classes=3, image_size=8)


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda **kw: nn.Identity())


@pytest.mark.parametrize("name", ["fastcnn", "fastcnn_s", "fastcnn_l", "resnet18_cifar", "mlp"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 28), (1, 32)])
def test_output_and_feature_shapes(name, channels, size):
    model = create_model(name, in_channels=channels, num_classes=7, image_size=size, seed=0).eval()
    assert isinstance(model, Classifier)
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    assert feats.shape == (3, model.num_features)
    assert model.num_classes == 7
    torch.testing.assert_close(model.head(feats), logits)


def test_expected_feature_widths():
    assert create_model("fastcnn", in_channels=1, num_classes=10, image_size=28).num_features == 128
    assert create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, widths=(8, 16, 32)).num_features == 32
    assert create_model("fastcnn_s", in_channels=1, num_classes=10, image_size=28).num_features == 64
    assert create_model("fastcnn_l", in_channels=3, num_classes=10, image_size=32).num_features == 256
    assert create_model("resnet18_cifar", in_channels=3, num_classes=10, image_size=32).num_features == 512
    assert create_model("mlp", in_channels=1, num_classes=10, image_size=28, hidden=64).num_features == 64


def test_resnet18_cifar_keeps_resolution_in_the_stem():
    model = create_model("resnet18_cifar", in_channels=1, num_classes=10, image_size=28)
    stem = model.backbone.conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == 1
    assert isinstance(model.backbone.maxpool, nn.Identity)


def test_fastcnn_refuses_images_too_small_for_its_depth():
    with pytest.raises(ValueError, match="image_size"):
        create_model("fastcnn", in_channels=1, num_classes=10, image_size=4)
    with pytest.raises(ValueError, match="even"):
        create_model("fastcnn_s", in_channels=1, num_classes=10, image_size=27)


def test_fastcnn_stems_keep_full_resolution_activations_out_of_s2d():
    x = torch.randn(2, 3, 32, 32)
    conv = create_model("fastcnn", in_channels=3, num_classes=10, image_size=32, widths=(8, 16, 32, 64))
    s2d = create_model("fastcnn", in_channels=3, num_classes=10, image_size=32, widths=(8, 16, 32, 64), stem="s2d")
    assert s2d.body[1].in_channels == 12 and s2d.body[1].stride == (1, 1)
    assert conv.body(x).shape == s2d.body(x).shape == (2, 64, 4, 4)
    assert isinstance(create_model("fastcnn_s", in_channels=1, num_classes=10, image_size=28).body[0], torch.nn.PixelUnshuffle)


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (3, 3, 6, 10)])
def test_the_s2d_stem_gives_pixel_unshuffles_values_in_channels_last(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    got = SpaceToDepth()(x)
    assert torch.equal(got, torch.nn.PixelUnshuffle(2)(x)) and got.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(got, x, torch.arange(got.numel(), dtype=torch.float32).view(got.shape))
    assert torch.equal(grad, torch.nn.PixelShuffle(2)(torch.arange(got.numel(), dtype=torch.float32).view(got.shape)))
    with pytest.raises(RuntimeError):
        SpaceToDepth()(torch.randn(1, 1, 5, 4))  # torch's error for a size the factor does not divide


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=1)
    b = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=1)
    c = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28, seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize("size", [(28, 28), (7, 7), (14, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("native_kernel", [True, False])
def test_fastcnn_pool_gives_torchs_max_pool_bit_for_bit(size, dtype, layout, native_kernel, monkeypatch):
    """Native kernel or (where it does not apply) strided views in inference and torch's kernel in training."""
    from semiprune_core.kernels import maxpool2
    from semiprune_core.models.fastcnn import MaxPool2

    if not native_kernel:
        monkeypatch.setattr(maxpool2, "applies", lambda x: False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, *size, generator=gen).mul(2).round().to(dtype)  # rounded: many ties in a window
    x[0, 0, 0, 0], x[1, 2, 3, 3] = float("nan"), float("-inf")
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        got = MaxPool2()(x)
    assert torch.equal(got.nan_to_num(), nn.MaxPool2d(2)(x).nan_to_num()) and got.isnan().sum() == 1
    x.requires_grad_(True)  # training: the gradient reaches the same elements
    grad = torch.randn(got.shape, generator=gen).to(dtype)
    assert torch.equal(torch.autograd.grad(MaxPool2()(x), x, grad)[0], torch.autograd.grad(nn.MaxPool2d(2)(x), x, grad)[0])


def test_fastcnn_pools_with_the_inference_pool():
    from semiprune_core.models.fastcnn import MaxPool2

    model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28)
    assert sum(isinstance(m, MaxPool2) for m in model.modules()) == 3


def _bf16_training_pass(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward under CPU bf16 autocast: (output, input gradient); the weight's lands in conv."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().backward(grad)
    return y, x.grad


@pytest.mark.parametrize("size", [(3, 3), (2, 3), (1, 1)])
def test_fastcnn_small_map_convs_train_with_torchs_values_and_gradients(size, monkeypatch):
    from semiprune_core.kernels import conv_wgrad
    from semiprune_core.models.fastcnn import SMALL_MAP_MIN_WORK, Conv3x3

    monkeypatch.setattr(conv_wgrad, "applies", lambda x, weight: False)  # a CPU without AMX: no tiles
    gen = torch.Generator().manual_seed(0)
    batch = SMALL_MAP_MIN_WORK // (32 * 64) + 1
    conv, ref = Conv3x3(32, 64), nn.Conv2d(32, 64, 3, padding=1, bias=False)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(batch, 32, *size, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, 64, *size, generator=gen).bfloat16().float()
    y, gx = _bf16_training_pass(conv, x, grad)
    y_ref, gx_ref = _bf16_training_pass(ref, x, grad)
    assert y.grad_fn.name() == "_SmallMapConvBackward"  # the matrix-product path ran
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)  # oneDNN's forward and input gradient
    # the weight gradient against float64 from the same bf16-rounded operands: bf16 rounding, no more
    x64 = x.bfloat16().double()
    w64 = conv.weight.detach().bfloat16().double().requires_grad_(True)
    torch.nn.functional.conv2d(x64, w64, padding=1).backward(grad.double())
    exact = w64.grad
    # oneDNN's own bf16 weight gradient is this close only where bf16 is native (AMX, AVX512-BF16): emulated
    # (an AVX2 EPYC), it was 3 % off, and there training runs in fp32 unless bf16 is forced
    for got in (conv.weight.grad, ref.weight.grad) if cpu_has_native_bf16() else (conv.weight.grad,):
        assert got.shape == exact.shape and float((got.double() - exact).norm() / exact.norm()) < 4e-3


@pytest.mark.parametrize("tiles", [True, False], ids=["this-cpu", "no-amx"])
def test_fastcnn_convs_are_torchs_outside_small_bf16_cpu_training(tiles, monkeypatch):
    from semiprune_core.kernels import conv_wgrad
    from semiprune_core.models.fastcnn import SMALL_MAP_MIN_WORK, Conv3x3

    if not tiles:
        monkeypatch.setattr(conv_wgrad, "applies", lambda x, weight: False)
    conv = Conv3x3(32, 64)
    big = SMALL_MAP_MIN_WORK // (32 * 64) + 1
    cases = {  # what each case leaves out: each path needs all of them
        "larger map": (conv, torch.randn(4, 32, 17, 17), True),  # past the AMX weight gradient's maps
        "channels the tiles do not take": (Conv3x3(24, 40), torch.randn(big, 24, 3, 3), True),
    }  # fp32 training has paths of its own (tests/unit/test_kernels.py, the fp32 weight gradient)
    if not tiles:
        cases["small layer"] = (conv, torch.randn(4, 32, 3, 3), True)
        cases["a bias"] = (Conv3x3(32, 64, bias=True), torch.randn(big, 32, 3, 3), True)
    for name, (layer, x, bf16) in cases.items():
        x.requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        assert y.grad_fn.name() == "ConvolutionBackward0", name
    x = torch.randn(big, 32, 3, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv(x), nn.functional.conv2d(x.bfloat16(), conv.weight.bfloat16(), padding=1))


def test_fastcnn_builds_its_convs_from_the_small_map_conv():
    from semiprune_core.models.fastcnn import Conv3x3

    model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28)
    assert sum(isinstance(m, Conv3x3) for m in model.modules()) == 4
    assert [k for k in model.state_dict() if k.endswith("weight")][0] == "body.0.weight"  # saved models still load
    small = create_model("fastcnn_s", in_channels=1, num_classes=10, image_size=28)  # the space-to-depth stem's too
    assert sum(isinstance(m, Conv3x3) for m in small.modules()) == 4
    assert list(small.state_dict())[:2] == ["body.1.weight", "body.1.bias"]  # saved models still load
