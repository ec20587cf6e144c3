"""A faster SAM image encoder: the same modules, weights and function as transformers' SamModel, less work.

It covers the families whose image encoder is SAM's ViT: SAM (``SamModel``) and SAM-HQ (``SamHQModel``, whose
encoder also returns the global layers' outputs, unchanged here). SAM2, the SAM3 tracker and EdgeTAM have other
encoders (Hiera, a RoPE ViT, timm): there ``fast_encoder_applies`` is False and ``enable_fast_encoder`` changes
nothing.

transformers' ``SamVisionAttention`` adds a decomposed relative-position bias to every attention score:
``bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)]``. It builds that bias as one float tensor of
batch x heads x N x N in a permuted layout, copies it into SDPA's layout and hands it to SDPA as a mask. For
the global-attention layers at 1024 input (N = 4096) that is 201 M numbers per layer, allocated, written,
copied and read back; with gradients SDPA falls back to its math path, which keeps several of them for backward.

Here the attention is computed per tile (one head, or a few windows, x a block of query rows): each tile's bias
is written by one broadcast add into a small reused buffer in the query's dtype and the kernel's layout, and
consumed while it is still in cache. With gradients, an autograd function recomputes each tile in backward
from the saved log-sum-exp (as flash attention does), so no N x N tensor lives between forward and backward.

In CPU inference the MLP's ``lin1`` and GELU also run as one oneDNN primitive (no separate pass over the
4 x wider hidden activations).

``enable_fast_encoder(model)`` swaps the class of each vision attention module, and of each image-encoder MLP
block, for a subclass that only overrides ``forward``: the module tree, parameter names and state-dict keys
stay transformers', so checkpoints, PEFT targets (``qkv``, ``proj``, ``lin1``, ``lin2``), merging and
``save_pretrained`` are unchanged, and the linear layers are still called as submodules (LoRA, DoRA and 4-bit
layers included; a wrapped ``lin1`` takes the unfused path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import GELUActivation
from transformers.models.sam.modeling_sam import (
    SamMLPBlock,
    SamVisionAttention,
    SamVisionLayer,
    SamVisionSdpaAttention,
)
from transformers.models.sam_hq.modeling_sam_hq import (
    SamHQMLPBlock,
    SamHQVisionAttention,
    SamHQVisionLayer,
    SamHQVisionSdpaAttention,
)

try:  # where transformers records attention weights when output_attentions is asked for
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions: only the explicit flag is seen
    _active_collector = None

# Scores per tile: 1 M (4 MB in fp32, one head x 256 query rows at 1024 input). Measured on the project's
# 2-core EPYC: smaller tiles pay per-call overhead, larger ones fall out of cache (benchmarks/RESULTS.md).
TILE_ELEMENTS = 2**20


def _attention_weights_requested() -> bool:
    collected = _active_collector.get() if _active_collector is not None else None
    return bool(collected) and "attentions" in collected


def _tile_shape(groups: int, rows: int, keys: int) -> tuple[int, int]:
    """(groups, rows) per tile so that a tile holds about TILE_ELEMENTS scores."""
    row_block = max(1, min(rows, TILE_ELEMENTS // keys))
    return max(1, min(groups, TILE_ELEMENTS // (row_block * keys))), row_block


def _tiles(groups: int, rows: int, group_block: int, row_block: int):
    for g0 in range(0, groups, group_block):
        for r0 in range(0, rows, row_block):
            yield slice(g0, g0 + group_block), slice(r0, r0 + row_block)


def _bias(rel_h: torch.Tensor, rel_w: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """bias[g, i, kh * Wk + kw] = rel_h[g, i, kh] + rel_w[g, i, kw], written into ``buffer`` in one pass.

    rel_h and rel_w come in fp32 whatever the buffer's dtype: the add then runs in fp32 and rounds once on
    writing, which is faster than a bf16 add (benchmarks/RESULTS.md, the fast image encoder's choices).
    """
    groups, rows, key_h = rel_h.shape
    key_w = rel_w.shape[-1]
    out = buffer[: groups * rows * key_h * key_w].view(groups, rows, key_h, key_w)
    torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=out)
    return out.view(groups, rows, key_h * key_w)


def _tiled(q: torch.Tensor) -> bool:
    # Tiles pay on CPUs (caches, no fused kernel that takes a bias gradient); GPU kernels read a full mask well.
    return q.device.type == "cpu"


def _add_scores(bias: torch.Tensor, q: torch.Tensor, keys_t: torch.Tensor, scale: float) -> torch.Tensor:
    """bias += scale * q @ keys_t, in place (the scores overwrite the bias: no copy of it into a new tensor)."""
    if bias.shape[0] == 1:
        # one head (global layers): the 2-D product, which reads the transposed keys as they are; the batched
        # one copies them per tile in bf16
        bias[0].addmm_(q[0], keys_t[0], alpha=scale)
        return bias
    return bias.baddbmm_(q, keys_t, alpha=scale)


def _fused_kernel(q: torch.Tensor, want_lse: bool) -> bool:
    # PyTorch's fused CPU kernel is fastest in fp32, and whenever the log-sum-exp is needed (training). Inference
    # in bf16: the kernel computes in fp32 on CPUs without AMX, so bf16 products and a separate softmax win.
    return q.dtype == torch.float32 or want_lse


def _attend(q, k, v, rel_h, rel_w, scale: float, want_lse: bool):
    """softmax(scale * q k^T + bias) v tile by tile, and the log-sum-exp per query if ``want_lse``.

    q: (groups, N, d); k, v: (groups, Nk, d); rel_h: (groups, N, Hk); rel_w: (groups, N, Wk), Hk * Wk = Nk.
    """
    groups, rows, _ = q.shape
    keys = k.shape[1]
    group_block, row_block = _tile_shape(groups, rows, keys)
    buffer = torch.empty(group_block * row_block * keys, dtype=q.dtype, device=q.device)
    rel_h, rel_w, keys_t = rel_h.float(), rel_w.float(), k.transpose(1, 2)  # no contiguous copy: it costs more
    out = torch.empty_like(q)
    lse = torch.empty(groups, rows, dtype=torch.float32, device=q.device) if want_lse else None
    fused = _fused_kernel(q, want_lse)
    for gs, rs in _tiles(groups, rows, group_block, row_block):
        bias = _bias(rel_h[gs, rs], rel_w[gs, rs], buffer)
        if fused:
            tile, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[None, gs, rs], k[None, gs], v[None, gs], attn_mask=bias[None], scale=scale
            )[:2]
            out[gs, rs] = tile[0]
            if want_lse:
                lse[gs, rs] = tile_lse[0]
            continue
        scores = _add_scores(bias, q[gs, rs], keys_t[gs], scale)
        probs = torch._softmax(scores, -1, False, out=scores)  # in place: no fresh N-wide output to allocate
        torch.bmm(probs, v[gs], out=out[gs, rs])
    return out, lse


class _RelPosAttention(torch.autograd.Function):
    """Attention with the decomposed bias; backward recomputes each tile's probabilities from the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale):
        out, lse = _attend(q, k, v, rel_h, rel_w, scale, want_lse=True)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale = ctx.scale
        groups, rows, _ = q.shape
        keys, key_h, key_w = k.shape[1], rel_h.shape[-1], rel_w.shape[-1]
        grad_out = grad_out.to(q.dtype)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i (fp32): the softmax backward's row term
        delta = (grad_out.float() * out.float()).sum(-1)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        grad_h = torch.empty(rel_h.shape, dtype=torch.float32, device=q.device)
        grad_w = torch.empty(rel_w.shape, dtype=torch.float32, device=q.device)
        group_block, row_block = _tile_shape(groups, rows, keys)
        buffer = torch.empty(group_block * row_block * keys, dtype=q.dtype, device=q.device)
        rel_h32, rel_w32, keys_t = rel_h.float(), rel_w.float(), k.transpose(1, 2)
        for gs, rs in _tiles(groups, rows, group_block, row_block):
            bias = _bias(rel_h32[gs, rs], rel_w32[gs, rs], buffer)
            scores = _add_scores(bias, q[gs, rs], keys_t[gs], scale).float()
            probs = scores.sub_(lse[gs, rs].unsqueeze(-1)).exp_()  # P, in place of the scores
            d_out = grad_out[gs, rs]
            grad_v[gs] += torch.bmm(probs.transpose(1, 2).to(v.dtype), d_out)
            d_scores = torch.bmm(d_out, v[gs].transpose(1, 2)).float()
            d_scores.sub_(delta[gs, rs].unsqueeze(-1)).mul_(probs)  # dS = P * (dP - delta)
            grid = d_scores.view(d_scores.shape[0], d_scores.shape[1], key_h, key_w)
            grad_h[gs, rs] = grid.sum(-1)
            grad_w[gs, rs] = grid.sum(-2)
            d_scores = d_scores.to(q.dtype)
            torch.bmm(d_scores, k[gs], out=grad_q[gs, rs])
            grad_q[gs, rs] *= scale
            grad_k[gs] += torch.bmm(d_scores.transpose(1, 2), q[gs, rs]).float() * scale
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_h.to(rel_h.dtype), grad_w.to(rel_w.dtype), None


def rel_pos_attention(q, k, v, rel_h, rel_w, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + rel_h[..., row(key)] + rel_w[..., col(key)]) v; shapes as in ``_attend``."""
    with torch.autocast(q.device.type, enabled=False):  # dtypes are chosen here, explicitly
        dtype = q.dtype
        k, v, rel_h, rel_w = k.to(dtype), v.to(dtype), rel_h.to(dtype), rel_w.to(dtype)
        if not _tiled(q):
            # one fused SDPA call with the bias built once, in its layout and dtype, with its gradient through
            # the broadcast add; not measured on a GPU yet
            bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2)  # contiguous: no copy in flatten
            return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None], scale=scale)[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w))
        if needs_grad:
            return _RelPosAttention.apply(q, k, v, rel_h, rel_w, scale)
        return _attend(q, k, v, rel_h, rel_w, scale, want_lse=False)[0]


class _FastForward:
    """The forward of SAM's (and SAM-HQ's, the same code) vision attention, computed by ``rel_pos_attention``;
    everything else inherited."""

    def forward(self, hidden_states: torch.Tensor, output_attentions=None):
        # the SDPA classes ignore attention dropout (they pass no dropout_p); the eager ones apply it
        dropout = self.training and self.dropout > 0 and not isinstance(self, _SDPA_ATTENTION)
        if output_attentions or dropout or _attention_weights_requested():
            return super().forward(hidden_states, output_attentions)  # eager weights / dropout: the original
        batch, height, width, _ = hidden_states.shape
        heads = self.num_attention_heads
        # (3, batch * heads, N, head_dim): one copy of qkv into the per-head layout the kernels read
        qkv = self.qkv(hidden_states).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, height * width, -1).unbind(0)
        if self.use_rel_pos:
            rel_h, rel_w = self._rel_terms(q, height, width)
            out = rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out), None

    def _rel_terms(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """rel_h (groups, N, height) and rel_w (groups, N, width): the query against each key row / column."""
        pos_h = self.get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)
        pos_w = self.get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
        grid = q.view(q.shape[0], height, width, -1)
        rel_h = torch.einsum("ghwc,hkc->ghwk", grid, pos_h).reshape(q.shape[0], height * width, height)
        rel_w = torch.einsum("ghwc,wkc->ghwk", grid, pos_w).reshape(q.shape[0], height * width, width)
        return rel_h, rel_w


class FastSamVisionAttention(_FastForward, SamVisionAttention):
    """SamVisionAttention (eager) with the tiled forward; attention weights still come from the original."""


class FastSamVisionSdpaAttention(_FastForward, SamVisionSdpaAttention):
    """SamVisionSdpaAttention with the tiled forward."""


class FastSamHQVisionAttention(_FastForward, SamHQVisionAttention):
    """SamHQVisionAttention (eager) with the tiled forward; attention weights still come from the original."""


class FastSamHQVisionSdpaAttention(_FastForward, SamHQVisionSdpaAttention):
    """SamHQVisionSdpaAttention with the tiled forward."""


_SDPA_ATTENTION = (SamVisionSdpaAttention, SamHQVisionSdpaAttention)


# fp32 lin1 + GELU fused only from this input width up: below it oneDNN's fp32 product loses to MKL's (SlimSAM-77,
# 168 wide); bf16 gains at every width (benchmarks/RESULTS.md)
FUSE_FP32_MIN_WIDTH = 512


# oneDNN's fused linear + pointwise op, as inductor uses it; absent from builds without oneDNN
_LINEAR_POINTWISE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _FusedMLP:
    """The image encoder's MLP with ``lin1`` and GELU as one oneDNN primitive in CPU inference.

    The separate GELU pass over the 4 x wider hidden activations is a large share of the MLP's first half
    (benchmarks/RESULTS.md). The fused path needs no gradients, a plain ``nn.Linear`` lin1 (an adapter
    or a 4-bit layer there takes the original path; merged adapters are plain again) and exact GELU.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self._fused_dtype(hidden_states)
        if dtype is None:
            return super().forward(hidden_states)
        bias = None if self.lin1.bias is None else self.lin1.bias.to(dtype)
        hidden = torch.ops.mkldnn._linear_pointwise(
            hidden_states.to(dtype), self.lin1.weight.to(dtype), bias, "gelu", [], "none"
        )
        return self.lin2(hidden)

    def _fused_dtype(self, hidden_states: torch.Tensor) -> torch.dtype | None:
        """The dtype the fused lin1 + GELU computes in (autocast's, else the input's), or None: the original."""
        lin1, device = self.lin1, hidden_states.device.type
        if not (
            _LINEAR_POINTWISE
            and device == "cpu"
            and type(lin1) is torch.nn.Linear
            and type(self.act) is GELUActivation
            and self.act.act is F.gelu
        ):
            return None
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in lin1.parameters())):
            return None
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
        elif hidden_states.dtype == lin1.weight.dtype:
            dtype = hidden_states.dtype
        else:
            return None  # mixed dtypes: the original raises its own error
        if dtype == torch.bfloat16 or (dtype == torch.float32 and lin1.in_features >= FUSE_FP32_MIN_WIDTH):
            return dtype
        return None


class FastSamMLPBlock(_FusedMLP, SamMLPBlock):
    """SamMLPBlock with the fused lin1 + GELU (image encoder only)."""


class FastSamHQMLPBlock(_FusedMLP, SamHQMLPBlock):
    """SamHQMLPBlock with the fused lin1 + GELU (image encoder only)."""


_FAST = {
    SamVisionAttention: FastSamVisionAttention,
    SamVisionSdpaAttention: FastSamVisionSdpaAttention,
    SamMLPBlock: FastSamMLPBlock,
    SamHQVisionAttention: FastSamHQVisionAttention,
    SamHQVisionSdpaAttention: FastSamHQVisionSdpaAttention,
    SamHQMLPBlock: FastSamHQMLPBlock,
}
_PLAIN = {fast: plain for plain, fast in _FAST.items()}
# SAM's ViT: its attention (the SDPA classes subclass these) and its layers, whose MLP blocks are the encoder's
_VIT_ATTENTION = (SamVisionAttention, SamHQVisionAttention)
_VIT_LAYERS = (SamVisionLayer, SamHQVisionLayer)
_MLP_BLOCKS = (SamMLPBlock, SamHQMLPBlock)


def fast_encoder_applies(model: torch.nn.Module) -> bool:
    """True when ``model`` (a PeftModel or a bare vision encoder too) has SAM's ViT image encoder: SAM, SAM-HQ.

    False for families with other encoders (SAM2, SAM3 tracker, EdgeTAM): ``enable_fast_encoder`` leaves them as
    they are and returns 0.
    """
    return any(isinstance(module, _VIT_ATTENTION) for module in model.modules())


def enable_fast_encoder(model: torch.nn.Module) -> int:
    """Switch the image encoder's attention and MLP modules in ``model`` to the fast forwards; returns how many.

    0, with nothing changed, where the fast encoder does not apply (``fast_encoder_applies`` is False).
    """
    return _swap(model, _FAST)


def disable_fast_encoder(model: torch.nn.Module) -> int:
    """Back to transformers' own forward; returns how many modules were switched."""
    return _swap(model, _PLAIN)


def _swap(model: torch.nn.Module, classes: dict) -> int:
    # MLP blocks only inside the image encoder's layers: the mask decoder has Sam(HQ)MLPBlocks too
    encoder_mlps = {id(layer.mlp) for layer in model.modules() if isinstance(layer, _VIT_LAYERS)}
    count = 0
    for module in model.modules():
        target = classes.get(type(module))
        if target is None or (isinstance(module, _MLP_BLOCKS) and id(module) not in encoder_mlps):
            continue
        module.__class__ = target  # no new parameters or buffers: only forward changes
        count += 1
    return count


def uses_fast_encoder(model: torch.nn.Module) -> bool:
    """True when the model's vision attention modules run the fast forward."""
    return any(isinstance(module, _FastForward) for module in model.modules())
