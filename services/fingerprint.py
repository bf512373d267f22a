"""The run fingerprint: a hash of everything that changes what a captured feature means."""

from __future__ import annotations

import hashlib
import json

from services.api import run_pb2


def vocab_map_hash(d2t: list[int], draft_token_ids: list[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(d2t), list(draft_token_ids)]).encode())
    return h.hexdigest()[:16]


def run_fingerprint(config: run_pb2.RunConfig, vocab_hash: str) -> str:
    """Target revision, capture layers, max length, chat template, tokenizer, vocab map, and
    the generation settings of a run that regenerates its answers."""
    material = {
        "revision": config.target.revision,
        "aux_layer_ids": list(config.capture.aux_layer_ids),
        "max_length": config.capture.max_length,
        "chat_template": config.capture.chat_template,
        "tokenizer": config.target.tokenizer_hash,
        "vocab_map": vocab_hash,
    }
    if config.draft.algorithm not in ("", "eagle3"):
        # The algorithm decides which tensors a sample holds (see services.capture).
        material["algorithm"] = config.draft.algorithm
    if config.HasField("regenerate"):
        # Regenerated runs capture the target's answers, not the dataset's.
        r = config.regenerate
        material["regenerate"] = [r.mode, r.temperature, r.top_p, r.top_k, r.max_new_tokens,
                                  r.seed, r.per_epoch, r.on_truncation]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
