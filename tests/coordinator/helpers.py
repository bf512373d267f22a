"""Builders for coordinator tests: configs, vocab maps, datasets and refs."""

from __future__ import annotations

import json

from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb
from services.fingerprint import run_fingerprint, vocab_map_hash
from services.tensors import make_key

STORE = "memstore"


def vocab_map(size: int = 8) -> run_pb2.VocabMap:
    ids = list(range(3, 3 + size))
    d2t = [t - i for i, t in enumerate(ids)]
    return run_pb2.VocabMap(d2t=d2t, draft_token_ids=ids, hash=vocab_map_hash(d2t, ids))


def run_config(epochs: int = 1, world: int = 1, micro: int = 1, accum: int = 1,
               retain: int = run_pb2.RETAIN_POLICY_STEP, high: int = 0, low: int = 0,
               max_attempts: int = 3, max_deliveries: int = 3) -> run_pb2.RunConfig:
    return run_pb2.RunConfig(
        target=run_pb2.TargetConfig(model_path="/models/tiny", revision="r1", num_layers=8,
                                    hidden_size=16, vocab_size=100, tokenizer_hash="tok1"),
        capture=run_pb2.CaptureConfig(aux_layer_ids=[1, 3, 4], max_length=64),
        draft=run_pb2.DraftConfig(algorithm="eagle3", draft_vocab_size=8, ttt_length=3),
        step=run_pb2.StepGeometry(world_size=world, micro_batch=micro, accumulation=accum),
        training=run_pb2.TrainingConfig(learning_rate=1e-3, checkpoint_every=5),
        lease=run_pb2.LeaseConfig(lease_seconds=30, heartbeat_seconds=5, heartbeat_misses=3,
                                  max_attempts=max_attempts, max_deliveries=max_deliveries),
        watermark=run_pb2.WatermarkConfig(high_samples=high, low_samples=low,
                                          retry_after_seconds=0.5),
        epochs=epochs, retain=retain, dataset_name="test.jsonl",
    )


def fingerprint(cfg: run_pb2.RunConfig) -> str:
    return run_fingerprint(cfg, vocab_map().hash)


def dataset(n: int) -> list[str]:
    return [json.dumps({"conversations": [
        {"from": "human", "value": f"question {i}"},
        {"from": "gpt", "value": f"answer {i}"},
    ]}) for i in range(n)]


EAGLE3_SHAPES = (("input_ids", common_pb2.DTYPE_INT64, 8, None),
                 ("loss_mask", common_pb2.DTYPE_UINT8, 1, None),
                 ("aux_hidden_state", common_pb2.DTYPE_BFLOAT16, 2, 3 * 16),
                 ("hidden_state", common_pb2.DTYPE_BFLOAT16, 2, 16))
"""(name, dtype, itemsize, width or None for [L]) of a sample of ``run_config()``'s run."""


def ref_for(lease: cpb.PromptLease, run_id: str, num_tokens: int = 4, store: str = STORE
            ) -> common_pb2.SampleRef:
    ref = common_pb2.SampleRef(
        run_id=run_id, sample_id=lease.sample_id, prompt_id=lease.prompt_id, epoch=lease.epoch,
        generation=lease.generation, store=store, num_tokens=num_tokens, producer_id="p")
    for name, dtype, itemsize, width in EAGLE3_SHAPES:
        shape = [num_tokens] if width is None else [num_tokens, width]
        ref.tensors.add(name=name, dtype=dtype, shape=shape,
                        nbytes=itemsize * num_tokens * (width or 1),
                        key=make_key(store, run_id, lease.sample_id, lease.generation, name))
    return ref


def commit(lease: cpb.PromptLease, run_id: str, **kw: object) -> cpb.SampleCommit:
    return cpb.SampleCommit(ref=ref_for(lease, run_id, **kw), lease_token=lease.lease_token)
