"""Faster equivalents of three stock ops whose CPU kernels are slow at the tiny preset's shapes.

Measured on the development CPU, one thread (benchmarks/README.md, "three slow CPU kernels"):
- ``F.elu`` computes ``expm1`` one element at a time: 0.20 ms for a [160, 128] tensor, where the
  vectorised ``exp`` takes 0.013 ms. :class:`ELU` is ``max(exp(min(x, 0)) - 1, x)``, which equals
  ELU (alpha 1) because ``exp(x) - 1 >= x``; it differs from ``expm1`` by fp32 rounding (6e-8 at most).
- ``F.max_pool2d`` on a contiguous NCHW map takes 6.9 ms for the stem's [8, 64, 48, 48], against 1.2 ms
  through a channels-last copy; :class:`ChannelsLastMaxPool2d` gives the same values bit for bit.
- Under bf16 autocast, a convolution with a small output map (ResNet's last stage at 96 px: 3 x 3)
  spends most of its backward in oneDNN's weight gradient. :class:`SmallMapConv2d` runs such a
  convolution as an im2col matrix product (forward and both gradients): 4.7 vs 6.1 ms for a 512->512
  3 x 3 convolution on a 3 x 3 map alone; in the model it saves 4.8 ms of a 177 ms step. In fp32 (in the
  model: 12-16 ms a step slower) and on larger maps (alone: 1.3-4.5x slower) the stock convolution is
  faster, and runs.

ELU and the pooling run on both paths; the convolution only on the fast path (docs/method.md#training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SMALL_MAP_PIXELS = 16  # output maps up to 4 x 4 run as a matrix product under CPU bf16 autocast


class _ELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = torch.maximum(torch.exp(torch.clamp(x, max=0)) - 1, x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, out)


class ELU(nn.Module):
    """``nn.ELU()`` (alpha 1) with a vectorised forward on the CPU (torch's ELU backward, from the output);
    torch's own ELU on other devices, where it is one fast kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return _ELUFunction.apply(x) if x.device.type == "cpu" else F.elu(x)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` of a contiguous NCHW map on the CPU, computed on a channels-last copy; the values are the
    stock op's. Other inputs (a channels-last map, as on the GPU with ``train.channels_last``) pool as they are."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not x.is_contiguous():
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def _output_size(size: torch.Size, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...]) -> tuple[int, ...]:  # fmt: skip
    """A convolution's output map size (torch.nn.Conv2d's formula)."""
    return tuple(
        (side + 2 * pad - dil * (k - 1) - 1) // step + 1
        for side, pad, dil, k, step in zip(size, padding, dilation, kernel, stride, strict=True)
    )


class _Im2colConvolution(torch.autograd.Function):
    """``conv2d(x, weight)`` (groups 1, zero padding) in ``x``'s dtype as one matrix product of the weight with
    the input's patches (im2col), rows = (image, output pixel); both gradients are matrix products too, and the
    weight's gradient comes back in the weight's own dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> Tensor:  # fmt: skip
        kernel = tuple(weight.shape[2:])
        out_h, out_w = _output_size(x.shape[2:], kernel, stride, padding, dilation)
        matrix = weight.to(x.dtype).flatten(1)  # [O, C*kh*kw]
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
        rows = patches.transpose(1, 2).flatten(0, 1)  # [N*L, C*kh*kw]
        ctx.save_for_backward(rows, matrix)
        ctx.geometry = (x.shape, weight.shape, weight.dtype, stride, padding, dilation)
        out = torch.mm(rows, matrix.t())  # [N*L, O]
        return out.view(x.shape[0], out_h * out_w, -1).transpose(1, 2).reshape(x.shape[0], -1, out_h, out_w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        rows, matrix = ctx.saved_tensors
        x_shape, weight_shape, weight_dtype, stride, padding, dilation = ctx.geometry
        grad_rows = grad.flatten(2).transpose(1, 2).flatten(0, 1).to(matrix.dtype)  # [N*L, O]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_patches = torch.mm(grad_rows, matrix).view(x_shape[0], -1, matrix.shape[1]).transpose(1, 2)
            grad_x = F.fold(grad_patches, x_shape[2:], weight_shape[2:], dilation=dilation, padding=padding,
                            stride=stride)  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_rows.t(), rows).view(weight_shape).to(weight_dtype)
        return grad_x, grad_weight, None, None, None


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs as an im2col product when CPU bf16 autocast is on and its output map is small."""

    def forward(self, x: Tensor) -> Tensor:
        if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and self.groups == 1
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)):  # fmt: skip
            return super().forward(x)
        out_h, out_w = _output_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
        if out_h * out_w > SMALL_MAP_PIXELS:
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            out = _Im2colConvolution.apply(x.to(dtype), self.weight, self.stride, self.padding,
                                           self.dilation)  # fmt: skip
            return out if self.bias is None else out + self.bias.to(dtype)[:, None, None]


def use_cpu_ops(module: nn.Module) -> nn.Module:
    """``module`` with every Conv2d a :class:`SmallMapConv2d` and every MaxPool2d a :class:`ChannelsLastMaxPool2d`.

    The swap changes only the class, so parameters, buffers and state-dict keys stay as they are.
    """
    for child in module.modules():
        if type(child) is nn.Conv2d:
            child.__class__ = SmallMapConv2d
        elif type(child) is nn.MaxPool2d:
            child.__class__ = ChannelsLastMaxPool2d
    return module
