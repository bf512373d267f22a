"""The EAGLE3 draft model: single device, plain ``nn.Module``.

Layout (module names are the exported weight names, see docs/export.md):
``fc`` (3·Ht → H over the aux concat), ``midlayer`` (one Llama decoder layer whose attention
projections read ``[input_layernorm(embeds); hidden_norm(hidden)]``, i.e. 2H), ``norm``,
``lm_head`` (H → draft vocabulary), buffers ``d2t`` / ``t2d``; the target's token embedding is a
frozen, non-persistent buffer (not checkpointed, not exported: SGLang shares the target's).

``forward`` runs the training-time test: ``ttt_length`` unrolled draft steps, each feeding the
previous step's output hidden state back in, exactly as the draft runs at serving time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from trainer.strategies.layers import MLP, RMSNorm

_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of the draft; derived from the target's config so SGLang builds the same model."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    vocab_size: int
    """Target vocabulary size (the embedding's rows)."""
    draft_vocab_size: int
    target_hidden_size: int
    hidden_act: str = "silu"
    rope: dict[str, Any] = field(default_factory=dict)
    """The target's RoPE settings (``rope_theta`` / ``rope_scaling`` / ``rope_parameters``)."""

    @classmethod
    def from_target(cls, target_config: dict[str, Any], draft_vocab_size: int) -> Eagle3Config:
        """Mirror the target's attention/MLP geometry, with the given draft vocabulary."""
        hidden = int(target_config["hidden_size"])
        heads = int(target_config["num_attention_heads"])
        act = target_config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"target hidden_act={act!r}: the EAGLE3 draft supports 'silu' only")
        return cls(
            hidden_size=hidden,
            intermediate_size=int(target_config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(target_config.get("num_key_value_heads", heads)),
            head_dim=int(target_config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(target_config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(target_config.get("max_position_embeddings", 4096)),
            vocab_size=int(target_config["vocab_size"]),
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=hidden,
            rope={k: target_config[k] for k in _ROPE_KEYS if target_config.get(k) is not None},
        )

    def llama_config(self) -> LlamaConfig:
        """The equivalent one-layer ``LlamaConfig`` (used for RoPE and for export)."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            num_hidden_layers=1,
            hidden_act=self.hidden_act,
            tie_word_embeddings=False,
            **self.rope,
        )


class TTTAttention(nn.Module):
    """Self-attention over 2H inputs with the training-time-test key cache.

    At unroll step k a query at draft position j sees the step-0 keys of positions 0..j (causal,
    the real target features) and its own keys from steps 1..k (one per step, same position):
    the KV cache the draft has at serving time after k speculative steps from position j.
    """

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        )
        in_dim = 2 * cfg.hidden_size
        self.q_proj = nn.Linear(in_dim, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        causal_bias: torch.Tensor,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = self.heads // self.kv_heads
        cache.append((k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)))
        scale = 1.0 / math.sqrt(self.head_dim)
        k0, v0 = cache[0]
        scores = [torch.matmul(q, k0.transpose(2, 3)).float() * scale + causal_bias]
        # Keys of later unroll steps: each query only sees the key at its own position.
        scores += [((q * ki).sum(-1).float() * scale).unsqueeze(-1) for ki, _ in cache[1:]]
        probs = torch.cat(scores, dim=-1).softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs[..., :s], v0)
        for i, (_, vi) in enumerate(cache[1:]):
            out = out + probs[..., s + i].unsqueeze(-1) * vi
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class Eagle3DecoderLayer(nn.Module):
    """The draft's decoder layer: attention reads the normalised embedding and hidden state."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = TTTAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        causal_bias: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, cache, causal_bias)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    """The EAGLE3 draft; ``forward`` returns draft-vocabulary logits for every unroll step."""

    def __init__(
        self, cfg: Eagle3Config, embed: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor
    ) -> None:
        super().__init__()
        if embed.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(
                f"target embedding {tuple(embed.shape)} != (vocab_size, hidden_size) "
                f"({cfg.vocab_size}, {cfg.hidden_size})"
            )
        if d2t.shape != (cfg.draft_vocab_size,) or t2d.shape != (cfg.vocab_size,):
            raise ValueError("d2t must be [draft_vocab_size] and t2d [vocab_size]")
        self.config = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(cfg.llama_config())
        # Frozen and shared with the target at serving time: neither checkpointed nor exported.
        self.register_buffer("embed_weight", embed.detach().clone(), persistent=False)
        self.register_buffer("d2t", d2t.clone())
        self.register_buffer("t2d", t2d.clone())
        draft_ids = d2t + torch.arange(d2t.numel(), dtype=d2t.dtype)
        self.register_buffer("draft_ids", draft_ids, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, valid: torch.Tensor,
        ttt_length: int,
    ) -> list[torch.Tensor]:
        """Unroll the draft ``ttt_length`` steps over a padded batch.

        ``input_ids`` [B, T], ``aux_hidden`` [B, T, 3Ht], ``valid`` [B, T] (false on padding).
        Draft position j (0 ≤ j < T-1) starts from ``aux_hidden[j]``; at step k it embeds the
        token ``input_ids[j+1+k]`` and returns logits for the token at j+2+k. Returns one
        [B, T-1, Vd] tensor per step.
        """
        b, t = input_ids.shape
        s = t - 1
        # Features arrive in the capture's dtype (bf16 on GPU); the draft computes in its own.
        hidden = self.fc(aux_hidden[:, :s].to(self.fc.weight.dtype))
        positions = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
        # Draft position j exists iff token j+1 does; padded keys are never attended to.
        allowed = causal.unsqueeze(0) & valid[:, 1:].unsqueeze(1)
        bias = torch.zeros(b, 1, s, s, device=input_ids.device, dtype=torch.float32)
        bias = bias.masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
        padded_ids = F.pad(input_ids, (0, ttt_length))
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        logits = []
        for k in range(ttt_length):
            tokens = padded_ids[:, 1 + k : 1 + k + s]
            embeds = F.embedding(tokens, self.embed_weight).to(hidden.dtype)
            # RoPE position of step k at draft position j is j+k: the sequence slot it drafts.
            cos, sin = self.rotary(hidden, positions + k)
            hidden = self.midlayer(embeds, hidden, cos, sin, cache, bias)
            logits.append(self.lm_head(self.norm(hidden)))
        return logits
