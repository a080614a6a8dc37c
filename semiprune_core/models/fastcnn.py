"""A small CNN shaped for speed on a CPU: narrow at full resolution, wide at low resolution.

On 28x28 input the spatial sizes are 28 -> 14 -> 7 -> 3 (32 -> 16 -> 8 -> 4 for 32x32). Cost is
dominated by the full-resolution layers, so the first conv stays narrow and each 2x downsampling
buys room to double the width. Each stage is conv -> max-pool -> BatchNorm -> ReLU (airbench's
order): BatchNorm and ReLU then run on the pooled, 4x smaller tensor, which measured about 1.6x
faster per training step on a 2-core CPU than pooling before the conv, for the same conv cost.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import bn_relu as native_bn_relu
from ..kernels import conv_pool as native_conv_pool
from ..kernels import conv_wgrad as native_conv_wgrad
from ..kernels import conv_wgrad_f32 as native_conv_wgrad_f32
from ..kernels import maxpool2 as native_max_pool
from .base import Classifier
from .registry import register_model


class MaxPool2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)``, the same bits, faster on a CPU.

    On CPU tensors in channels_last (every conv model the engine trains) it runs the native kernel
    of :mod:`semiprune_core.kernels.maxpool2`. torch's kernel wrote an int64 index per output and
    its backward zero-filled and then scattered the input gradient: at FixMatch's 960 rows per step
    in bf16, ``fastcnn``'s first pool (16 channels at 28x28) took 12-13 ms forward and backward, the
    native one 3-4 ms. Where the kernel does not apply (a GPU, NCHW, no C compiler), inference takes
    the 2x2 maximum as two element-wise maxima over strided views (no index tensor either: 2.3x
    faster than torch's kernel on the CPU) and training keeps torch's kernel.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if native_max_pool.applies(x):
            return native_max_pool.max_pool2(x)
        if torch.is_grad_enabled():
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is dropped
        rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class SpaceToDepth(nn.PixelUnshuffle):
    """``nn.PixelUnshuffle(2)``, the same values, written straight into channels_last.

    torch's kernel wrote an NCHW tensor that the next conv then copied into channels_last: on
    ``fastcnn_s``'s stem at batch 512 (1 -> 4 channels at 28x28, bf16) the two with the conv's forward
    and backward took 1.63 ms, this 1.32 ms. Output channel ``4 * c + 2 * i + j`` holds the pixels at
    row offset ``i`` and column offset ``j`` of channel ``c``, as in torch's.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            return super().forward(x)  # torch's error
        out = torch.empty((n, h // 2, w // 2, c, 4), dtype=x.dtype, device=x.device)
        for k, (i, j) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            out[..., k].copy_(x[:, :, i::2, j::2].permute(0, 2, 3, 1))
        return out.view(n, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)


@functools.cache
def _tap_of_pairs(h: int, w: int, dtype: torch.dtype) -> Tensor:
    """(9, (h*w)**2) 0/1: row t marks the (output position, input position) pairs that kernel tap t
    links in a 3x3 convolution with padding 1 on an h x w map (each pair has at most one tap)."""
    out = torch.arange(h * w)
    dy = (out[None, :] // w - out[:, None] // w) + 1  # [p, q]: row of q relative to p, shifted to 0..2
    dx = (out[None, :] % w - out[:, None] % w) + 1
    taps = torch.zeros(9, h * w, h * w, dtype=dtype)
    valid = (dy >= 0) & (dy < 3) & (dx >= 0) & (dx < 3)
    p, q = valid.nonzero(as_tuple=True)
    taps[dy[p, q] * 3 + dx[p, q], p, q] = 1
    return taps.view(9, -1)


class _SmallMapConv(torch.autograd.Function):
    """bf16 3x3 convolution (stride 1, padding 1, no bias) with its weight gradient as one matrix product."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # oneDNN's backward-data kernel is fast: only the weights' is not
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = small_map_weight_grad(x, grad)
        return grad_x, grad_w


def small_map_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """The weight gradient (O, C, 3, 3) of a stride-1, padding-1 3x3 conv from its input ``x`` (N, C, H, W)
    and output gradient ``grad`` (N, O, H, W), as one matrix product over the batch: every (output
    position, input position) pair's (O, C) block at once, then summed into the nine taps."""
    b, c, h, w = x.shape
    o = grad.shape[1]
    g = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, h * w * o)
    xs = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(b, h * w * c)
    pairs = (g.t() @ xs).view(h * w, o, h * w, c).transpose(1, 2).reshape(-1, o * c)
    return (_tap_of_pairs(h, w, pairs.dtype) @ pairs).view(3, 3, o, c).permute(2, 3, 0, 1)


class _NativeWeightGradConv(torch.autograd.Function):
    """3x3 convolution (stride 1, padding 1, optional bias) in ``x``'s dtype, with its weight (and bias)
    gradient from a native kernel module (``kernel``: :mod:`semiprune_core.kernels.conv_wgrad`'s AMX tiles
    for bf16, :mod:`semiprune_core.kernels.conv_wgrad_f32` for fp32), in fp32 for the fp32 ``weight``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, kernel) -> Tensor:
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.kernel = kernel
        return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[2]:  # summed as the kernel reads grad
            grad_w, grad_b = ctx.kernel.conv3x3_weight_and_bias_grad(x, grad)
        elif ctx.needs_input_grad[1]:
            grad_w = ctx.kernel.conv3x3_weight_grad(x, grad)
        return grad_x, grad_w, grad_b, None


#: largest map (pixels) on which the AMX weight gradient beat oneDNN's (2-core Xeon, bf16, batch 512):
#: 1.4x at 14x14 and 1.2x at 16x16, 0.95x at 28x28
TILE_MAX_PIXELS = 256


#: c_in * c_out up to which the AMX weight gradient is taken over the matrix product on maps of 9 pixels
#: or fewer (2-core Xeon, bf16): 64 -> 128 at 3x3, batch 512, 0.77 against 0.94 ms (equal at 960); 128 -> 256
#: (``fastcnn_l``) 3.9 against 2.5 ms at batch 512, where a padded 3x3 map (16 positions for 9) costs the most
TILE_MAX_PAIRS_ON_SMALL_MAPS = 64 * 128


#: batch * c_in * c_out from which the matrix product beat oneDNN's backward-weights kernel on 3x3 maps
#: (2-core Sapphire Rapids, bf16): 64->128 channels at batch 256 and 32->64 at 960 gained, 48->96 at 256
#: and 32->64 at 256 (``fastcnn_s``) lost. In fp32 (2-core AMD EPYC, AVX2) it beat the AVX2 weight
#: gradient above it too (32->64 at batch 960 2.9 against 3.2 ms, 64->128 at 512 5.2 against 5.7; 64->128
#: at 256 equal) and lost below it (32->64 at 256 0.78 against 0.67 ms)
SMALL_MAP_MIN_WORK = 1_500_000


#: fewest input channels for which the fp32 AVX2 weight gradient beat oneDNN's (2-core AMD EPYC, batch
#: 512): 16 -> 32 at 14x14 1.15-1.3x; 8 -> 16 0.93-1.12x and 4 -> 8 0.6x (too few products per load)
F32_MIN_INPUT_CHANNELS = 16


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)`` that trains faster on a CPU.

    On a CPU with AMX, under CPU bf16 autocast, on maps of up to :data:`TILE_MAX_PIXELS` pixels (all of
    ``fastcnn``'s but the first, the first is :mod:`semiprune_core.kernels.conv_pool`'s) and with input
    and output channels each a multiple of 16 or at most 16, the weight gradient comes from
    :mod:`semiprune_core.kernels.conv_wgrad`: the fp32 sum of the exact bf16 products, where oneDNN's
    kernel rounds it to bf16 (0.17 % relative error against float64; the tiles' is below 1e-6), and
    1.3-1.7x (14x14 maps) to 2-6x (7x7 and 3x3 maps, where oneDNN's takes 3-10x its forward) as fast,
    batch 512 on two cores: 32 -> 64 channels at 7x7 1.37 -> 0.58 ms, at 3x3 0.95 -> 0.26 ms. A bias's
    gradient is summed in fp32 too. The forward and the input gradient stay oneDNN's bits.

    Without AMX (or, with AMX, for layers wider than :data:`TILE_MAX_PAIRS_ON_SMALL_MAPS`), on maps of
    3x3 pixels or fewer, without a bias and with enough work (:data:`SMALL_MAP_MIN_WORK`), the weight
    gradient is instead one matrix product over the batch,
    (pixels * c_out, batch) @ (batch, pixels * c_in), whose blocks are summed into the nine kernel taps:
    oneDNN's took 7-10x its forward there (2.9 ms of a 14 ms ``fastcnn`` step at batch 256, 11.8 ms
    at FixMatch's 960 rows; the product 4.7 ms). The same up to bf16 rounding (0.23 % relative error
    against float64, oneDNN's 0.16 %: the product's blocks are rounded before the taps sum them).

    In fp32 training (no autocast; CPUs without native bf16 train so), the same product takes the same
    small maps, and elsewhere layers of at least :data:`F32_MIN_INPUT_CHANNELS` input channels and a
    multiple of 8 output channels take :mod:`semiprune_core.kernels.conv_wgrad_f32`'s AVX2 weight
    gradient where it is built (AVX2 and FMA, no AVX-512): 1.15-1.6x oneDNN's on ``fastcnn``'s layers,
    fp32 sums in another order. The forward and the input gradient stay oneDNN's bits.

    Elsewhere (a GPU, larger maps in bf16, other channel counts, inference, ``torch.compile``) it is
    ``nn.Conv2d``, bit for bit.
    """

    def __init__(self, c_in: int, c_out: int, *, bias: bool = False) -> None:
        super().__init__(c_in, c_out, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        autocast = torch.is_autocast_enabled("cpu")
        pixels, pairs = x.shape[-2] * x.shape[-1], self.in_channels * self.out_channels
        product = pixels <= 9 and self.bias is None and x.shape[0] * pairs >= SMALL_MAP_MIN_WORK
        if autocast and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            if (pixels <= TILE_MAX_PIXELS and self.weight.requires_grad and native_conv_wgrad.applies(x, self.weight)
                    and not (product and pairs > TILE_MAX_PAIRS_ON_SMALL_MAPS)):
                with torch.autocast("cpu", enabled=False):
                    return _NativeWeightGradConv.apply(x.to(torch.bfloat16), self.weight, self.bias, native_conv_wgrad)
            if product:
                with torch.autocast("cpu", enabled=False):
                    return _SmallMapConv.apply(x.to(torch.bfloat16), self.weight.to(torch.bfloat16))
        elif not autocast and x.dtype == self.weight.dtype == torch.float32 and self.weight.requires_grad:
            if product:
                return _SmallMapConv.apply(x, self.weight)
            if self.in_channels >= F32_MIN_INPUT_CHANNELS and native_conv_wgrad_f32.applies(x, self.weight):
                return _NativeWeightGradConv.apply(x, self.weight, self.bias, native_conv_wgrad_f32)
        return super().forward(x)


def _relu_at(body: nn.Sequential, i: int) -> bool:
    return i < len(body) and isinstance(body[i], nn.ReLU)


def _bn_relu_after(body: nn.Sequential, i: int) -> tuple[Tensor, Tensor] | None:
    """The fused kernels' terms of ``body[i]``, ``body[i + 1]`` if they are an eval-mode BatchNorm with
    running statistics and a ReLU, else None."""
    if _relu_at(body, i + 1):
        bn = body[i]
        if isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_var is not None:
            return native_max_pool.bn_relu_terms(bn)
    return None


def _stage(c_in: int, c_out: int, *, pool: bool, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = [Conv3x3(c_in, c_out)]
    if pool:
        layers.append(MaxPool2())
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    for _ in range(depth - 1):
        layers += [Conv3x3(c_out, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return layers


class FastCNN(Classifier):
    """One stage per width: conv3x3 -> max-pool 2 (all but the last stage) -> BN -> ReLU, plus
    ``depth - 1`` extra conv-BN-ReLU at the pooled resolution. Global max-pool + linear head.
    ``features(x)``: (B, widths[-1]).

    On a CPU the first conv and its pool run as one native kernel where it builds
    (:mod:`semiprune_core.kernels.conv_pool`): torch's values up to the order of fp32 sums, its
    weight gradient summed in fp32 where oneDNN's bf16 kernel rounds it to bf16. In inference (no
    gradient, eval mode) the pool kernels also apply the BatchNorm and ReLU after them, and the last
    BatchNorm and ReLU are taken with the global max-pool from each channel's extreme; in training
    mode each BatchNorm and its ReLU run as one kernel (:mod:`semiprune_core.kernels.bn_relu`, torch's
    values to rounding, the running statistics updated alike). Either way those modules are not called
    (their forward hooks do not run).

    ``stem="s2d"`` replaces the first stage's full-resolution conv + pool by a space-to-depth
    rearrangement (each 2x2 pixel block becomes 4 channels) and a conv (with bias, no BatchNorm,
    like airbench's whitening stem) at half resolution: the same spatial sizes afterwards, no
    full-resolution activation at all.
    """

    def __init__(self, *, in_channels: int, num_classes: int, widths: tuple[int, ...], depth: int = 1, stem: str = "conv"):
        super().__init__()
        if len(widths) < 2 or depth < 1:
            raise ValueError("fastcnn needs at least two widths and depth >= 1")
        if stem not in ("conv", "s2d"):
            raise ValueError(f"fastcnn stem must be 'conv' or 's2d', got {stem!r}")
        if stem == "s2d":
            # no BatchNorm right after the stem conv: with 8 channels in channels_last it cost ~20% of a step
            layers: list[nn.Module] = [SpaceToDepth(), Conv3x3(4 * in_channels, widths[0], bias=True), nn.ReLU(inplace=True)]
            for _ in range(depth - 1):
                layers += [Conv3x3(widths[0], widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        else:
            layers = _stage(in_channels, widths[0], pool=True, depth=depth)
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
            layers += _stage(c_in, c_out, pool=i < len(widths) - 1, depth=depth)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def _global_max_pool(self) -> bool:
        return isinstance(self.pool, nn.AdaptiveMaxPool2d) and self.pool.output_size in (1, (1, 1))

    def features(self, x: Tensor) -> Tensor:
        body, i = self.body, 0
        inference = not torch.is_grad_enabled()
        if isinstance(body[0], Conv3x3) and isinstance(body[1], MaxPool2) and native_conv_pool.applies(x, body[0]):
            # the first conv and its pool in one native kernel: the full-resolution map is never written
            terms = _bn_relu_after(body, 2) if inference else None
            x = native_conv_pool.conv3x3_max_pool2(x, body[0].weight, terms)
            i = 4 if terms else 2
        while i < len(body):
            if (inference and i == len(body) - 2 and self._global_max_pool and native_max_pool.applies(x)
                    and (terms := _bn_relu_after(body, i))):
                # inference: the last BatchNorm, ReLU and the global max-pool from each channel's extreme
                return native_max_pool.bn_relu_global_max(x, terms)
            if inference and isinstance(body[i], MaxPool2) and native_max_pool.applies(x) and (terms := _bn_relu_after(body, i + 1)):
                # inference: the BatchNorm and ReLU after a pool are applied as the pool writes its output,
                # instead of two more passes over it (a quarter of fastcnn's inference)
                x = native_max_pool.max_pool2(x, terms)
                i += 3
            elif _relu_at(body, i + 1) and native_bn_relu.applies(x, body[i]):
                # a training-mode BatchNorm and its ReLU in one kernel: two passes over memory each way
                x = native_bn_relu.batch_norm_relu(x, body[i])
                i += 2
            else:
                x = body[i](x)
                i += 1
        return self.pool(x).flatten(1)


def _fastcnn(default_widths: tuple[int, ...], default_stem: str = "conv"):
    def factory(
        *, in_channels: int, num_classes: int, image_size: int,
        widths: tuple[int, ...] = default_widths, depth: int = 1, stem: str = default_stem,
    ) -> FastCNN:
        if image_size < 2 ** (len(widths) - 1) or (stem == "s2d" and image_size % 2):
            raise ValueError(f"fastcnn with {len(widths)} widths needs an image_size >= {2 ** (len(widths) - 1)} (even for stem 's2d')")
        return FastCNN(in_channels=in_channels, num_classes=num_classes, widths=tuple(widths), depth=depth, stem=stem)

    factory.__doc__ = f"FastCNN with widths {default_widths}, stem {default_stem!r} (override with ``widths=``, ``depth=``, ``stem=``)."
    return factory


# Measured on Fashion-MNIST, 2-core CPU, fp32, channels_last (benchmarks/bench_engine.py):
#   fastcnn_s  batch 512: ~37k img/s, 92.2% test accuracy after 24 epochs (~41 s)
#   fastcnn    batch 256: ~14k img/s, 92.6% after 10 epochs (~42 s)
#   fastcnn_l  batch 256:  ~5k img/s, 93.2% after 10 epochs
fastcnn_s = register_model("fastcnn_s")(_fastcnn((8, 16, 32, 64), "s2d"))
fastcnn = register_model("fastcnn")(_fastcnn((16, 32, 64, 128)))
fastcnn_l = register_model("fastcnn_l")(_fastcnn((32, 64, 128, 256)))
