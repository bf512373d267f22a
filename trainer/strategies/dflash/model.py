"""The DFlash and Domino draft models: single device, plain ``nn.Module``.

Layout (module names are the exported weight names, as SGLang's DFlash loader reads them):
``layers[i]`` (Qwen3 decoder layers: ``self_attn.{q,k,v,o}_proj``, ``q_norm``, ``k_norm``,
``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``), ``fc``
(K·H → H over the captured target layers), ``hidden_norm``, ``norm``; Domino adds
``prefix_gru`` and ``embed_proj``. The rotary table is a non-persistent buffer. There is no
embedding and no ``lm_head``: both are the target's, frozen, passed in by the loss.

The backbone: the target context ``ctx = hidden_norm(fc(target features))`` is computed once and
re-projected into every layer's keys and values ("KV injection"); queries come only from the
blocks ``[anchor token, MASK x (bs-1)]``. Keys are ``k_norm([k_proj(ctx); k_proj(LN(x))])``.
Context positions are 0..S-1 and block n's are ``anchor_n + 0..bs-1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from trainer.strategies.dflash.config import DFlashConfig
from trainer.strategies.dflash.mask import block_mask
from trainer.strategies.dflash.objective import block_terms
from trainer.strategies.layers import MLP, RMSNorm


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, heads, T, hd] with cos/sin [B, T, hd]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           backend: str) -> torch.Tensor:
    """Masked attention, [B, heads, Q, hd]; query rows with no allowed key return zeros.

    Such rows (blocks with ``keep = False``) are given every key for the kernel and zeroed
    afterwards, so neither backend ever normalises an empty row: outputs and gradients stay
    finite (a NaN there would survive a zero loss weight)."""
    live = allowed.any(-1, keepdim=True)
    allowed = allowed | ~live
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    elif backend == "eager":
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q, k.transpose(2, 3)).to(dtype) * scale
        scores = scores.masked_fill(~allowed, torch.finfo(dtype).min)
        out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    else:
        raise ValueError(f"attention_backend={backend!r}: use 'sdpa' or 'eager'")
    return out.masked_fill(~live, 0.0)


class DFlashAttention(nn.Module):
    """Queries from the block slots; keys/values from the target context and the blocks."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, backend: str) -> torch.Tensor:
        b, q_len, _ = x.shape
        kv_len = ctx.shape[1] + q_len
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.heads, self.head_dim))
        kv_in = torch.cat([ctx, x], dim=1)
        k = self.k_norm(self.k_proj(kv_in).view(b, kv_len, self.kv_heads, self.head_dim))
        v = self.v_proj(kv_in).view(b, kv_len, self.kv_heads, self.head_dim)
        q = _rotate(q.transpose(1, 2), cos[:, -q_len:], sin[:, -q_len:])
        k = _rotate(k.transpose(1, 2), cos, sin)
        out = attend(q, k, v.transpose(1, 2), allowed, backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, self.heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    """Pre-norm residual layer; attention also reads the (shared) target context."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                allowed: torch.Tensor, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, allowed, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraft(nn.Module):
    """The DFlash draft; ``forward`` returns the objective sums of a set of blocks."""

    def __init__(self, cfg: DFlashConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.layers = nn.ModuleList(DFlashDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(cfg.qwen3_config())
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def noise_embeddings(self, block_ids: torch.Tensor, keep: torch.Tensor,
                         embed: torch.Tensor) -> torch.Tensor:
        """[B, N, bs, H]: the anchor token then MASK; dropped blocks are all MASK."""
        first = torch.zeros_like(block_ids, dtype=torch.bool)
        first[..., 0] = True
        ids = torch.where(first & keep.unsqueeze(-1), block_ids, self.config.mask_token_id)
        return F.embedding(ids, embed).to(self.fc.weight.dtype)

    def backbone(self, noise: torch.Tensor, target_hidden: torch.Tensor, anchors: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        """Draft hidden states [B, N, bs, H] (after ``norm``) for blocks ``noise`` [B,N,bs,H]."""
        cfg = self.config
        b, n, bs, h = noise.shape
        seq_len = target_hidden.shape[1]
        # Features arrive in the capture's dtype (bf16 on GPU); the draft computes in its own.
        ctx = self.hidden_norm(self.fc(target_hidden.to(self.fc.weight.dtype)))
        block_pos = (anchors.unsqueeze(-1) + torch.arange(bs, device=anchors.device)).view(b, -1)
        ctx_pos = torch.arange(seq_len, device=anchors.device).expand(b, -1)
        cos, sin = self.rotary_emb(ctx, torch.cat([ctx_pos, block_pos], dim=1))
        masks = {
            kind: block_mask(anchors, keep, seq_len, bs,
                             cfg.sliding_window if kind == "sliding_attention" else 0)
            for kind in set(cfg.layer_types)
        }
        x = noise.reshape(b, n * bs, h)
        for layer, kind in zip(self.layers, cfg.layer_types, strict=True):
            x = layer(x, ctx, cos, sin, masks[kind], cfg.attention_backend)
        return self.norm(x).view(b, n, bs, h)

    def head_logits(self, hidden: torch.Tensor, block_ids: torch.Tensor, embed: torch.Tensor,
                    lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(final, base) logits [B, n, bs, V]; DFlash's final logits are the base ones."""
        base = hidden @ lm_head.to(hidden.dtype).T
        return base, base

    def forward(self, target_hidden: torch.Tensor, block_ids: torch.Tensor,
                anchors: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor, supervised: torch.Tensor, embed: torch.Tensor,
                lm_head: torch.Tensor) -> dict[str, torch.Tensor]:
        """Objective sums (``objective.TERMS``) over the blocks at ``anchors``.

        The objective runs inside ``forward`` so that data-parallel wrappers see every
        parameter use (the Domino head included)."""
        noise = self.noise_embeddings(block_ids, keep, embed)
        hidden = self.backbone(noise, target_hidden, anchors, keep)

        def head_fn(h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.head_logits(h, ids, embed, lm_head)

        return block_terms(head_fn, hidden, block_ids, labels, weight, supervised,
                           vocab=self.config.vocab_size,
                           chunk_blocks=self.config.objective_chunk_blocks,
                           with_base=self.config.is_domino)


class DominoDraft(DFlashDraft):
    """DFlash plus Domino's head: ``final = base + embed_proj([h ; GRU(earlier tokens)])`` on
    block positions from ``suffix_start``; earlier positions keep the base logits.

    The GRU reads the target's embeddings of the block's tokens a, a+1, ... (teacher forcing;
    at serving time the accepted proposals, which are the same tokens while drafts are
    accepted). The state used at position p summarises tokens a..a+p with ``shift_label``
    (position p predicts a+p+1) and a..a+p-1 without (p predicts a+p)."""

    def __init__(self, cfg: DFlashConfig) -> None:
        if not cfg.is_domino:
            raise ValueError(f"projector_type={cfg.projector_type!r}: DominoDraft needs 'domino'")
        super().__init__(cfg)
        h = cfg.hidden_size
        self.prefix_gru = nn.GRU(h, cfg.gru_hidden_dim, num_layers=1, batch_first=True,
                                 bias=False)
        self.embed_proj = nn.Sequential(
            nn.Linear(h + cfg.gru_hidden_dim, cfg.emb_dim, bias=False),
            nn.SiLU(),
            nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False),
        )
        for module in self.embed_proj:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def head_logits(self, hidden: torch.Tensor, block_ids: torch.Tensor, embed: torch.Tensor,
                    lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        base = hidden @ lm_head.to(hidden.dtype).T
        b, n, bs, h = hidden.shape
        start = cfg.suffix_start
        steps = bs if cfg.shift_label else bs - 1
        tokens = F.embedding(block_ids[..., :steps], embed).to(self.prefix_gru.weight_ih_l0.dtype)
        states, _ = self.prefix_gru(tokens.reshape(b * n, steps, h))
        # State index for position p is p (shift) or p - 1: from pure_draft_prefix_len on.
        first = cfg.pure_draft_prefix_len
        prefix = states.view(b, n, steps, -1)[:, :, first : first + bs - start]
        correction = self.embed_proj(torch.cat([hidden[:, :, start:], prefix.to(hidden.dtype)],
                                               dim=-1))
        final = torch.cat([base[:, :, :start], base[:, :, start:] + correction], dim=2)
        return final, base
