"""Every fast path gives the same numbers as the plain path, within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from istr.engine.optim import build_optimizer
from istr.engine.precision import autocast, native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fused_adamw_matches_the_per_tensor_implementation(tiny_cfg):
    """build_optimizer's fused AdamW vs torch's foreach AdamW: same weights after 5 steps (fp32, 1e-6)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    plain = torch.nn.Sequential(*(type(m)(*a) for m, a in zip(model, [(8, 16), (16,), (16, 3)], strict=True)))
    plain.load_state_dict(model.state_dict())
    fused_opt, _ = build_optimizer(model, tiny_cfg.train)
    assert fused_opt.defaults["fused"]
    group = fused_opt.param_groups[0]  # lr as the warm-up schedule set it
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=group["lr"], weight_decay=group["weight_decay"], foreach=False)
    data = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    for x in data:
        for net, opt in ((model, fused_opt), (plain, plain_opt)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not torch.equal(model[0].weight, torch.nn.Linear(8, 16).weight)


@pytest.mark.parametrize(("device", "by_changes"), [("cpu", False), ("cpu", True), pytest.param("cuda", None, marks=(
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the change search then runs on the GPU")))])
def test_rle_is_byte_identical_to_pycocotools(device, by_changes):
    """encode_masks (runs from each mask's occupied box, or from its value changes) vs pycocotools' encode."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from istr.engine.rle import encode_masks

    gen = torch.Generator().manual_seed(0)
    height, width = 37, 53
    masks = torch.zeros(7, height, width, dtype=torch.bool)
    masks[0, 5:20, 10:30] = torch.rand(15, 20, generator=gen) > 0.3  # ragged blob
    masks[1] = torch.rand(height, width, generator=gen) > 0.5  # touches every border
    masks[2, 0, 0] = masks[2, -1, -1] = True  # first and last pixel
    masks[3, :, 52] = True  # last column only
    masks[4, 36, :] = True  # last row only: runs that wrap across columns
    masks[5, 10:12, 0:53] = True
    # masks[6] stays empty
    expected = mask_utils.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    got = encode_masks(masks.to(device), by_changes)
    assert [r["counts"] for r in got] == [r["counts"] for r in expected]
    assert [r["size"] for r in got] == [[height, width]] * 7
    pasted = torch.rand(3, 64, 96, generator=gen) > 0.5  # uint8 masks as postprocess returns them
    expected = mask_utils.encode(np.asfortranarray(pasted.numpy().astype(np.uint8).transpose(1, 2, 0)))
    got = encode_masks(pasted.to(torch.uint8).to(device), by_changes)
    assert [r["counts"] for r in got] == [r["counts"] for r in expected]


def _train_losses_and_grads(
    cfg, amp: bool = False, **model_overrides
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Unweighted loss terms and parameter gradients of one ISTR step on a seeded synthetic batch (under bf16
    autocast with ``amp``, as ``train_step`` runs it)."""
    import dataclasses

    from istr.bench.inputs import fit_bench_codec, synthetic_batch
    from istr.data.collate import collate_batch
    from istr.losses import build_criterion, loss_weights, weighted_sum
    from istr.matcher import build_matcher
    from istr.model import build_model
    from istr.targets import prepare_targets

    codec = fit_bench_codec(cfg.codec.dim)
    images, targets = synthetic_batch(2, 64, 96, num_classes=3)
    batch = collate_batch(list(zip(images, targets)))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg.model, **model_overrides), 3, codec.dim)
    criterion = build_criterion(cfg.loss, build_matcher(cfg.matcher, codec), codec)
    target = prepare_targets(batch["targets"], batch["image_sizes"], codec, torch.device("cpu"))
    with autocast(torch.device("cpu"), amp):
        outputs = model(batch["images"], batch["image_sizes"])
    losses = criterion(outputs, target)
    weighted_sum(losses, loss_weights(cfg.loss)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_sparse_pooler_trains_like_grid_sample(tiny_cfg):
    """model.pooler=sparse vs grid_sample: every stage's loss terms (1e-5) and every parameter gradient (1e-4)."""
    losses, grads = _train_losses_and_grads(tiny_cfg, pooler="grid_sample")
    fast_losses, fast_grads = _train_losses_and_grads(tiny_cfg, pooler="sparse")
    assert fast_losses.keys() == losses.keys() and len(losses) > 4
    for name, value in losses.items():
        torch.testing.assert_close(fast_losses[name], value, rtol=1e-5, atol=1e-5, msg=name)
    assert fast_grads.keys() == grads.keys()
    assert any(n.startswith("backbone.fpn") and g.abs().sum() > 0 for n, g in grads.items())
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_split_linear_gradients_match_autograd():
    """DynamicConv's parameter layer without the split's concatenation: gradcheck in float64, and the
    same output and gradients as ``linear(...).split`` in float32 (1e-5)."""
    from istr.model.head import _SplitLinear

    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, dtype=torch.float64, generator=gen) for shape in ((5, 6), (8, 6), (8,)))
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: _SplitLinear.apply(*a, 4), inputs)
    results = []
    for fast in (False, True):
        leaves = [t.detach().float().requires_grad_() for t in inputs]
        parts = _SplitLinear.apply(*leaves, 4) if fast else torch.nn.functional.linear(*leaves).split(4, dim=1)
        (parts[0].sin().sum() + parts[1].pow(2).sum()).backward()
        results.append([*parts, *(t.grad for t in leaves)])
    for fast, plain in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_dynamic_conv_gradients_pass_gradcheck():
    """DynamicConv's fast backward (split linear, in-place ReLUs) against finite differences, float64."""
    from istr.model.head import DynamicConv

    torch.manual_seed(0)
    conv = DynamicConv(hidden_dim=6, dynamic_dim=3, pooler_resolution=2).double()
    queries = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (queries, rois))
    weight = conv.dynamic_layer.weight
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(conv, {"dynamic_layer.weight": w}, (queries, rois)), (weight,)
    )


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16: train.amp runs fp32 on it")
def test_bf16_autocast_step_matches_fp32(tiny_cfg):
    """train.amp on the CPU vs fp32, from the same weights on the same batch: every stage's loss terms within 1%
    (measured: 0.25% at most), and the gradients point the same way (cosine over all parameters > 0.9; measured
    0.94). Whether bf16 costs AP is measured over seeds, not here (docs/method.md#training, "Precision")."""
    losses, grads = _train_losses_and_grads(tiny_cfg)
    fast_losses, fast_grads = _train_losses_and_grads(tiny_cfg, amp=True)
    assert fast_losses.keys() == losses.keys() and len(losses) > 4
    for name, value in losses.items():
        torch.testing.assert_close(fast_losses[name], value, rtol=1e-2, atol=1e-3, msg=name)
    plain = torch.cat([g.flatten() for g in grads.values()])
    fast = torch.cat([fast_grads[n].flatten().float() for n in grads])
    assert torch.nn.functional.cosine_similarity(fast, plain, dim=0) > 0.9
    assert not torch.equal(fast, plain)  # autocast did change the computation


def test_frozen_batch_norm_keeps_the_input_dtype_and_torchvisions_fp32_numbers():
    """The backbone's FrozenBatchNorm2d: torchvision's in fp32, bit for bit; a bf16 input stays bf16 (no fp32 map)."""
    from torchvision.ops import FrozenBatchNorm2d as Reference

    from istr.model.backbone import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(0)
    ours, reference = FrozenBatchNorm2d(6), Reference(6)
    for key in ("weight", "bias", "running_mean", "running_var"):
        value = torch.rand(6, generator=gen) + 0.5
        getattr(ours, key).copy_(value)
        getattr(reference, key).copy_(value)
    x = torch.randn(2, 6, 5, 7, generator=gen)
    assert torch.equal(ours(x), reference(x))
    assert reference(x.bfloat16()).dtype == torch.float32 and ours(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x.bfloat16()).float(), reference(x), rtol=2e-2, atol=2e-2)


def test_elu_matches_torchs_values_and_gradients():
    """cpu_ops.ELU vs F.elu (alpha 1), fp32: values within 1e-6 (fp32 rounding of exp(x) - 1 vs expm1), the
    same gradients; a bf16 input stays bf16."""
    from istr.model.cpu_ops import ELU

    x = torch.cat([torch.linspace(-30, 5, 701), torch.tensor([0.0, -1e-8, 1e-8])])
    ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    out, expected = ELU()(ours), torch.nn.functional.elu(plain)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-6, atol=1e-6)
    assert ELU()(x.bfloat16()).dtype == torch.bfloat16


def test_channels_last_max_pool_is_torchs_bit_for_bit():
    """The stem's pooling through a channels-last copy: the same values and input gradients as nn.MaxPool2d."""
    from istr.model.cpu_ops import ChannelsLastMaxPool2d

    x = torch.randn(2, 5, 13, 11, generator=torch.Generator().manual_seed(0))
    ours, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ChannelsLastMaxPool2d(3, 2, 1)(ours), torch.nn.MaxPool2d(3, 2, 1)(plain)
    assert out.is_contiguous() and torch.equal(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(ours.grad, plain.grad)
    channels_last = x.contiguous(memory_format=torch.channels_last)  # e.g. train.channels_last: it stays so
    assert ChannelsLastMaxPool2d(3, 2, 1)(channels_last).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16: train.amp runs fp32 on it")
@pytest.mark.parametrize(("in_channels", "stride", "side", "im2col"), [
    (16, 1, 3, True), (8, 2, 6, True), (8, 2, 7, True), (8, 1, 5, False)])  # fmt: skip
def test_small_map_convolution_matches_the_stock_one_under_bf16(in_channels, stride, side, im2col):
    """SmallMapConv2d under CPU bf16 autocast vs nn.Conv2d under it, same weights: output and both gradients
    within bf16 rounding (2e-2 of their scale). It runs as a matrix product only for maps of at most
    SMALL_MAP_PIXELS outputs, and in fp32 it is the stock convolution bit for bit."""
    from istr.model.cpu_ops import SmallMapConv2d

    gen = torch.Generator().manual_seed(0)
    stock = torch.nn.Conv2d(in_channels, 12, 3, stride, 1)
    ours = SmallMapConv2d(in_channels, 12, 3, stride, 1)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(4, in_channels, side, side, generator=gen)
    grad = None
    results = []
    for conv in (stock, ours):
        leaf = x.clone().requires_grad_()
        with autocast(torch.device("cpu"), enabled=True):
            out = conv(leaf)
        grad = torch.randn(out.shape, generator=gen) if grad is None else grad
        out.backward(grad.to(out.dtype))
        results.append((out.detach().float(), leaf.grad, conv.weight.grad, conv.bias.grad, type(out.grad_fn).__name__))
    for name, got, expected in zip(("output", "input grad", "weight grad", "bias grad"), results[1], results[0],
                                   strict=False):  # fmt: skip
        assert got.dtype == expected.dtype, name
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * scale, msg=name)
    assert (results[1][4] != results[0][4]) == im2col  # the matrix product ran where the map is small
    assert torch.equal(ours(x), stock(x))  # fp32: the stock convolution


def test_the_backbone_and_heads_use_the_cpu_ops(tiny_cfg):
    """build_model swaps in the faster CPU ops, keeping torchvision's parameter names."""
    from torchvision.models import resnet18

    from istr.model import build_model
    from istr.model.cpu_ops import ELU, ChannelsLastMaxPool2d, SmallMapConv2d

    model = build_model(tiny_cfg.model, 3, 8)
    body = model.backbone.body
    assert type(body.maxpool) is ChannelsLastMaxPool2d
    assert all(type(m) is SmallMapConv2d for m in body.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(type(m) is torch.nn.ELU for m in model.modules()) and any(type(m) is ELU for m in model.modules())
    torchvision_keys = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    assert torchvision_keys <= set(body.state_dict())
