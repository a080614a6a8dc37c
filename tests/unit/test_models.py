"""Model registry: names, errors, output and feature shapes, seeded initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semiprune_core.errors import ConfigError
from semiprune_core.models import Classifier, create_model, list_models, register_model


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
    assert create_model("fastcnn_s", in_channels=1, num_classes=10, image_size=28).body[0].__class__.__name__ == "PixelUnshuffle"


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
def test_fastcnn_inference_pool_gives_torchs_max_pool_bit_for_bit(size, dtype, layout):
    from semiprune_core.models.fastcnn import MaxPool2

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, *size, generator=gen).mul(2).round().to(dtype)  # rounded: many ties in a window
    x[0, 0, 0, 0], x[1, 2, 3, 3] = float("nan"), float("-inf")
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        got = MaxPool2()(x)
    assert torch.equal(got.nan_to_num(), nn.MaxPool2d(2)(x).nan_to_num()) and got.isnan().sum() == 1
    x.requires_grad_(True)  # training: torch's kernel, so the gradient reaches the same elements
    assert MaxPool2()(x).grad_fn.name() == nn.MaxPool2d(2)(x).grad_fn.name()


def test_fastcnn_pools_with_the_inference_pool():
    from semiprune_core.models.fastcnn import MaxPool2

    model = create_model("fastcnn", in_channels=1, num_classes=10, image_size=28)
    assert sum(isinstance(m, MaxPool2) for m in model.modules()) == 3
