"""One refinement stage of ISTR: self-attention + dynamic attention + FFN + heads (docs/method.md#architecture).

The attention type is an ablation axis (docs/method.md#ablations): ``ATTENTIONS`` names, per arm, the module the
queries attend to each other with (or none) and the module a query reads its RoI with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from istr.model.cpu_ops import ELU
from istr.registry import pick

# detectron2's Box2BoxTransform clamp: exp() of larger deltas would overflow.
_SCALE_CLAMP = math.log(1000.0 / 16)


class _SplitLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias).split(size, dim=1)`` with a backward that never concatenates.

    Autograd's split backward first concatenates the parts' gradients into one [N, out] tensor
    (2*d*dynamic_dim wide: 78 MB per stage at 600 queries); here each part's weight gradient is one
    GEMM written straight into its rows of the weight gradient, and x's gradient sums one GEMM per part.
    fp32 only (the caller keeps autograd's path under autocast).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, size: int) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, weight)
        ctx.size = size
        return F.linear(x, weight, bias).split(size, dim=1)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        weights = weight.split(ctx.size, dim=0)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grads[0] @ weights[0]
            for grad, part in zip(grads[1:], weights[1:]):
                grad_x.addmm_(grad, part)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            for grad, rows in zip(grads, grad_weight.split(ctx.size, dim=0)):
                torch.mm(grad.t(), x, out=rows)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.cat([grad.sum(0) for grad in grads])
        return grad_x, grad_weight, grad_bias, None


class RoIInteraction(nn.Module):
    """A query reads its own RoI (docs/method.md#architecture): two 1x1 convs (d -> dynamic_dim -> d) over the
    RoI features, each followed by LayerNorm + ReLU, then flatten + Linear to d.

    Subclasses say where the convs' parameters come from: ``make_conv_params`` creates them (first, so that
    ``DynamicConv`` initialises in Sparse R-CNN's order) and ``conv_params`` gives each query's pair.
    """

    def __init__(self, hidden_dim: int, dynamic_dim: int, pooler_resolution: int) -> None:
        super().__init__()
        self.hidden_dim, self.dynamic_dim = hidden_dim, dynamic_dim
        self.make_conv_params()
        self.norm1 = nn.LayerNorm(dynamic_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def make_conv_params(self) -> None:
        raise NotImplementedError

    def conv_params(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """queries [N, d] -> the two convs' weights per query, [N, d, dynamic_dim] and [N, dynamic_dim, d]."""
        raise NotImplementedError

    def forward(self, queries: Tensor, roi_features: Tensor) -> Tensor:
        """queries [N, d], roi_features [N, S*S, d] -> [N, d]."""
        first, second = self.conv_params(queries)
        # in-place ReLUs: LayerNorm's backward needs its input, not its output; saves a [N, S*S, d] tensor
        x = torch.relu_(self.norm1(torch.bmm(roi_features, first)))
        x = torch.relu_(self.norm2(torch.bmm(x, second)))
        return torch.relu_(self.norm3(self.out_layer(x.flatten(1))))


class DynamicConv(RoIInteraction):
    """Dynamic attention of a query to its RoI (Sparse R-CNN's DynamicConv): a linear layer turns the query
    feature into the parameters of the two 1x1 convs."""

    def make_conv_params(self) -> None:
        self.dynamic_layer = nn.Linear(self.hidden_dim, 2 * self.hidden_dim * self.dynamic_dim)

    def conv_params(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        size = self.hidden_dim * self.dynamic_dim
        if torch.is_autocast_enabled(queries.device.type):
            # split, not slicing: its backward concatenates the two grads, where each slice's backward
            # would zero-fill and add a full [N, 2*d*dynamic_dim] tensor (~10% of a CPU train step)
            first, second = self.dynamic_layer(queries).split(size, dim=1)
        else:
            first, second = _SplitLinear.apply(queries, self.dynamic_layer.weight, self.dynamic_layer.bias, size)
        return first.view(-1, self.hidden_dim, self.dynamic_dim), second.view(-1, self.dynamic_dim, self.hidden_dim)


class StaticConv(RoIInteraction):
    """The ``self`` arm's RoI read: the same two 1x1 convs with static learned weights.

    Without dynamic attention a query still needs its RoI, so the parameters are plain
    learnable tensors shared by all queries instead of being generated from the query feature.
    """

    def make_conv_params(self) -> None:
        self.first = nn.Parameter(torch.empty(self.hidden_dim, self.dynamic_dim))
        self.second = nn.Parameter(torch.empty(self.dynamic_dim, self.hidden_dim))
        nn.init.kaiming_uniform_(self.first, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.second, a=math.sqrt(5))

    def conv_params(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        n = queries.shape[0]
        return self.first.expand(n, -1, -1), self.second.expand(n, -1, -1)


class QuerySelfAttention(nn.Module):
    """Multi-head self-attention among a stage's queries, with its residual and LayerNorm: [B, k, d] -> [B, k, d]."""

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor) -> Tensor:
        attended = self.attn(queries, queries, queries, need_weights=False)[0]
        return self.norm(queries + self.dropout(attended))


@dataclass(frozen=True)
class StageAttention:
    """An attention arm: how the queries attend to each other (a module built as ``(hidden_dim, num_heads,
    dropout)``, [B, k, d] -> [B, k, d]; None: they do not) and how a query reads its RoI."""

    query_attention: type[nn.Module] | None
    roi_interaction: type[RoIInteraction]


ATTENTIONS: dict[str, StageAttention] = {
    "self+dynamic": StageAttention(QuerySelfAttention, DynamicConv),
    "self": StageAttention(QuerySelfAttention, StaticConv),
    "dynamic": StageAttention(None, DynamicConv),
}
# state-dict names before the query attention was its own module, so that older checkpoints still load
_RENAMED = {"self_attn.": "query_attention.attn.", "norm_attn.": "query_attention.norm."}


def _mlp_tower(dim: int, layers: int, activation: type[nn.Module]) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), activation()]
    return nn.Sequential(*blocks)


def apply_deltas(deltas: Tensor, boxes: Tensor, weights: tuple[float, ...] = (2.0, 2.0, 1.0, 1.0)) -> Tensor:
    """Refine x1y1x2y2 ``boxes`` by (dx, dy, dw, dh) deltas with weights (2,2,1,1) (docs/method.md#architecture)."""
    # Box arithmetic in float32 even under bf16 autocast: bf16 cannot hold pixel coordinates.
    deltas, boxes = deltas.float(), boxes.float()
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = (deltas[:, 2] / ww).clamp(max=_SCALE_CLAMP)
    dh = (deltas[:, 3] / wh).clamp(max=_SCALE_CLAMP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=1,
    )


class ISTRStage(nn.Module):
    """Stage i of the N-step recurrent refinement: queries + RoI features -> class, box, embedding."""

    def __init__(
        self,
        num_classes: int,
        code_dim: int,
        hidden_dim: int,
        num_heads: int,
        ffn_dim: int,
        dynamic_dim: int,
        pooler_resolution: int,
        attention: str,
        head_layers: int = 3,
        dropout: float = 0.0,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        arm = pick(ATTENTIONS, attention, "model.attention")
        self.query_attention = arm.query_attention(hidden_dim, num_heads, dropout) if arm.query_attention else None
        self.interaction = arm.roi_interaction(hidden_dim, dynamic_dim, pooler_resolution)
        self.norm_interaction = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, hidden_dim)
        )
        self.norm_ffn = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)
        # Class, box and mask towers: 3 x (Linear-LN-ELU) each, as the authors' first release.
        self.cls_tower = _mlp_tower(hidden_dim, head_layers, ELU)
        self.reg_tower = _mlp_tower(hidden_dim, head_layers, ELU)
        self.mask_tower = _mlp_tower(hidden_dim, head_layers, ELU)
        self.class_logits = nn.Linear(hidden_dim, num_classes)
        self.box_deltas = nn.Linear(hidden_dim, 4)
        self.code_head = nn.Linear(hidden_dim, code_dim)
        nn.init.constant_(self.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box_deltas.weight)
        nn.init.zeros_(self.box_deltas.bias)
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    def forward(self, queries: Tensor, roi_features: Tensor, boxes: Tensor) -> dict[str, Tensor]:
        """queries [B,k,d], roi_features [B*k, S*S, d], boxes [B,k,4] (detached) -> stage outputs."""
        batch, k, dim = queries.shape
        if self.query_attention is not None:
            queries = self.query_attention(queries)
        flat = queries.reshape(batch * k, dim)
        flat = self.norm_interaction(flat + self.dropout(self.interaction(flat, roi_features)))
        flat = self.norm_ffn(flat + self.dropout(self.ffn(flat)))
        deltas = self.box_deltas(self.reg_tower(flat))
        new_boxes = apply_deltas(deltas, boxes.reshape(-1, 4))
        return {
            "queries": flat.view(batch, k, dim),
            "logits": self.class_logits(self.cls_tower(flat)).view(batch, k, -1),
            "boxes": new_boxes.view(batch, k, 4),
            "codes": self.code_head(self.mask_tower(flat)).view(batch, k, -1),
        }


def _rename_old_keys(state_dict: dict, prefix: str, *args) -> None:
    """Load a checkpoint written before ``query_attention`` held the self-attention and its norm."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in _RENAMED.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
