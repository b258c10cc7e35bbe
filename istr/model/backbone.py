"""ResNet + FPN backbone producing P2-P5 (docs/method.md#architecture, "Backbone").

Built from torchvision parts; weights come only from an optional local file, never a download.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import FrozenBatchNorm2d as _TorchvisionFrozenBatchNorm2d

from istr.model.cpu_ops import use_cpu_ops

RESNETS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


class FrozenBatchNorm2d(_TorchvisionFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d, computed in the input's dtype.

    Under bf16 autocast its fp32 scale and bias would promote the whole feature map to fp32 (and the
    next convolution would cast it back): on the CPU those casts and fp32 passes cost more than the
    convolutions they sit between. In fp32 it is torchvision's computation, bit for bit.
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[:, None, None] + bias.to(x.dtype)[:, None, None]


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
LEVEL_NAMES = ("p2", "p3", "p4", "p5")


class BackboneFPN(nn.Module):
    """ResNet stages C2-C5 -> FPN P2-P5 with ``out_channels`` channels, strides 4-32."""

    def __init__(
        self, name: str, out_channels: int, norm: str = "frozen_bn", weights: Path | None = None, freeze_at: int = 2
    ) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(RESNETS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        body = RESNETS[name](weights=None, norm_layer=NORMS[norm])
        stage_channels = [_out_channels(getattr(body, f"layer{i}")) for i in range(1, 5)]
        self.body = IntermediateLayerGetter(
            body, return_layers={"layer1": "p2", "layer2": "p3", "layer3": "p4", "layer4": "p5"}
        )
        self.fpn = FeaturePyramidNetwork(stage_channels, out_channels)
        use_cpu_ops(self)  # the same computation, faster CPU kernels (istr/model/cpu_ops.py)
        self.out_channels = out_channels
        self.strides = (4, 8, 16, 32)
        if weights is not None:
            load_local_weights(self, Path(weights))
            # As detectron2's FREEZE_AT (2 in the reference configs): from pretrained weights, the stem
            # (1) and the first residual stage (2) stay fixed, which also skips their backward pass.
            for names in (("conv1", "bn1"), ("layer1",))[:freeze_at]:
                for name in names:
                    setattr(self.body, name, frozen(getattr(self.body, name)))

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))


def frozen(module: nn.Module) -> nn.Module:
    """``module`` without gradients, every BatchNorm2d in it a FrozenBatchNorm2d of its current statistics."""
    if isinstance(module, nn.BatchNorm2d):
        fixed = FrozenBatchNorm2d(module.num_features, module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(fixed, key).copy_(getattr(module, key).detach())
        return fixed
    for name, child in module.named_children():
        setattr(module, name, frozen(child))
    return module.requires_grad_(False)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def load_local_weights(backbone: BackboneFPN, path: Path) -> None:
    """Load weights from disk, never a download; fail loudly if nothing matches.

    Either a whole ``BackboneFPN`` state dict (``body.*`` + ``fpn.*``, what ``istr pretrain-backbone``
    writes) or a torchvision ResNet state dict (loaded into the ResNet body only).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained backbone weights not found: {path} (set model.pretrained=none "
            "to train from scratch; weights are never downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    target = backbone if any(key.startswith("fpn.") for key in state) else backbone.body
    result = target.load_state_dict(state, strict=False)
    loaded = len(target.state_dict()) - len(result.missing_keys)
    if loaded == 0:
        raise ValueError(f"{path} holds no weights matching the backbone (missing: {result.missing_keys[:5]}...)")
