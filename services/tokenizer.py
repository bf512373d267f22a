"""The tokenizer's identity: a stable hash that goes into the run fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, special tokens and chat template.

    Two tokenizers with the same hash turn the same chat into the same token ids. ``tokenizer``
    is any ``transformers`` tokenizer (``get_vocab``, ``all_special_tokens``, ``chat_template``).
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    material: dict[str, Any] = {
        "vocab": vocab,
        "added": sorted((int(i), str(t), bool(getattr(t, "special", False)))
                        for i, t in added.items()),
        "special": sorted(tokenizer.all_special_tokens),
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "chat_template": tokenizer.chat_template or "",
    }
    encoded = json.dumps(material, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]
