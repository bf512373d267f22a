"""The frozen part of the target the trainer needs: its token embedding and its ``lm_head``.

Only these two matrices are read from the model directory's safetensors (one file or a sharded
index); the rest of the target is never loaded. Tied embeddings reuse the embedding matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

EMBED_NAMES = (
    "model.embed_tokens.weight",
    "embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
)
HEAD_NAMES = ("lm_head.weight",)


class TargetHeadError(RuntimeError):
    """The model directory lacks what the trainer needs; the message says what is missing."""


@dataclass(frozen=True)
class TargetHead:
    """Frozen target matrices: ``embed`` [V, H] and ``lm_head`` [V, H], plus the target's config."""

    embed: torch.Tensor
    lm_head: torch.Tensor
    config: dict

    @property
    def vocab_size(self) -> int:
        return int(self.embed.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.embed.shape[1])

    def to(self, device: torch.device | str) -> TargetHead:
        return TargetHead(self.embed.to(device), self.lm_head.to(device), self.config)


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the shard index or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise TargetHeadError(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json; "
            "convert the target to safetensors (save_pretrained(..., safe_serialization=True))"
        )
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping


def _read(files: dict[str, Path], name: str, dtype: torch.dtype) -> torch.Tensor:
    with safe_open(str(files[name]), framework="pt") as f:
        return f.get_tensor(name).to(dtype)


def load_target_head(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> TargetHead:
    """Read only the embedding and ``lm_head`` of the target in ``model_dir``."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise TargetHeadError(
            f"{config_path} does not exist; point target.model_path at an HF model directory"
        )
    config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    files = _weight_files(model_dir)
    embed_name = next((n for n in EMBED_NAMES if n in files), None)
    if embed_name is None:
        raise TargetHeadError(f"{model_dir}: no embedding among {EMBED_NAMES}")
    embed = _read(files, embed_name, dtype)
    tied = bool(text_config.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    head_name = next((n for n in HEAD_NAMES if n in files), None)
    if head_name is None or tied:
        if head_name is None and not tied:
            raise TargetHeadError(
                f"{model_dir}: no lm_head.weight and tie_word_embeddings is false; "
                "the checkpoint is incomplete"
            )
        head = embed
    else:
        head = _read(files, head_name, dtype)
    if head.shape != embed.shape:
        raise TargetHeadError(
            f"{model_dir}: lm_head {tuple(head.shape)} and embedding {tuple(embed.shape)} differ"
        )
    return TargetHead(embed=embed, lm_head=head, config=text_config)
