"""Every fast path gives the same numbers as the plain path, within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from istr.engine.train import build_optimizer

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
