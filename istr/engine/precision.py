"""bf16 autocast where the device computes bf16 natively: CUDA, and CPUs with AVX-512 BF16 or AMX.

``train.amp`` asks for it (docs/method.md#training, "Precision"); a device without native bf16 runs fp32,
where emulated bf16 would only be slower. Parameters, optimizer state, box arithmetic and the losses
stay fp32 under autocast.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` ('cpu' / 'cuda') computes bf16 matrix products in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_amp(device: torch.device, amp: bool) -> bool:
    """``train.amp`` on ``device``: bf16 autocast only where the device has native bf16."""
    return amp and native_bf16(device.type)


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """The one bf16 autocast region of a train step or an inference."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
