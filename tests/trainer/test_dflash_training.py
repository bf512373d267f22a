"""DFlash and Domino through the real trainer: resume is bitwise (Domino's curriculum included),
features read back from a real Mooncake store train bit-identically to in-process ones, and two
gloo ranks match one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.store import open_store
from tests.trainer.coordinated import store_url
from tests.trainer.helpers import run_rank
from trainer.config import TrainerConfig
from trainer.loop import Trainer, build_trainer
from trainer.parallel import DistContext, Mode, init_distributed
from trainer.steps import Geometry, InProcessSteps
from trainer.strategies.dflash import linear_lambda_base

DFLASH = {"num_hidden_layers": 1, "block_size": 4, "num_anchors": 16, "loss_decay_gamma": 4.0,
          "mask_token_id": 3, "objective_chunk_blocks": 8}
DOMINO = {**DFLASH, "emb_dim": 16, "gru_hidden_dim": 16, "shift_label": True,
          "pure_draft_prefix_len": 1, "lambda_base_start": 1.0, "lambda_base_decay_ratio": 0.5}
TOTAL_STEPS = 6


def dflash_samples(tiny) -> list[dict[str, torch.Tensor]]:
    """The tiny target's captured layers as DFlash features (``hidden_states``, no final)."""
    return [{"input_ids": s["input_ids"], "loss_mask": s["loss_mask"],
             "hidden_states": s["aux_hidden_state"]} for s in tiny.train]


def make(tiny, algorithm: str, geometry: Geometry, checkpoint_dir: Path | None = None,
         dist_ctx: DistContext | None = None, parallel: Mode = "none") -> Trainer:
    options = DOMINO if algorithm == "domino" else DFLASH
    cfg = TrainerConfig(learning_rate=3e-3, warmup_steps=2, geometry=geometry,
                        checkpoint_every=3, seed=7, algorithm=algorithm,
                        total_steps=TOTAL_STEPS, draft_options=options)
    return build_trainer(cfg, tiny.target_dir, [], tiny.aux_layer_ids, dist_ctx=dist_ctx,
                         parallel=parallel, checkpoint_dir=checkpoint_dir)


def train(trainer: Trainer, samples, geometry: Geometry, max_steps: int) -> list[dict]:
    metrics: list[dict] = []
    trainer.run(InProcessSteps(samples, geometry), max_steps=max_steps,
                on_step=lambda _s, m: metrics.append(m))
    return metrics


def test_domino_resume_is_bitwise_and_restores_the_curriculum(tiny, tmp_path: Path) -> None:
    geo = Geometry(1, 2, 2)
    samples = dflash_samples(tiny)
    whole = train(make(tiny, "domino", geo), samples, geo, TOTAL_STEPS)

    first = make(tiny, "domino", geo, checkpoint_dir=tmp_path / "ck")
    before = train(first, samples, geo, 3)
    del first  # the process that wrote step 3 is gone; a new one resumes from its checkpoint
    resumed = make(tiny, "domino", geo, checkpoint_dir=tmp_path / "ck")
    assert resumed.resume() == 3
    after = train(resumed, samples, geo, TOTAL_STEPS)

    assert [m["loss"] for m in before + after] == [m["loss"] for m in whole]
    assert [m["lambda_base"] for m in before + after] == [m["lambda_base"] for m in whole]
    # lambda follows the optimizer step: 1 at step 0, 0 from half of the horizon on.
    assert [m["lambda_base"] for m in whole] == pytest.approx(
        [linear_lambda_base(s, TOTAL_STEPS, 1.0, 0.5) for s in range(TOTAL_STEPS)])
    assert whole[0]["lambda_base"] == 1.0 and whole[-1]["lambda_base"] == 0.0
    for key in ("base_loss", "base_accuracy", "accept_len", "base_accept_len",
                "acceptance_length", "acc_0"):
        assert all(torch.isfinite(torch.tensor(m[key])) for m in whole), key


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_mooncake_features_train_bit_identically(tiny, master, algorithm: str) -> None:
    geo = Geometry(1, 2, 1)
    samples = dflash_samples(tiny)[:8]
    store = open_store(store_url(master, f"dflash-{algorithm}", segment_mb=64, buffer_mb=16))
    try:
        read_back = []
        for i, sample in enumerate(samples):
            specs = store.put_sample("dflash", f"s{i}:e0", 0, sample)
            read_back.append(store.get_sample(specs))
    finally:
        store.close()
    in_process = train(make(tiny, algorithm, geo), samples, geo, 4)
    through_store = train(make(tiny, algorithm, geo), read_back, geo, 4)
    assert [m["loss"] for m in through_store] == [m["loss"] for m in in_process]


def _rank_main(rank: int, tiny, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def body() -> None:
        ctx = init_distributed("cpu", timeout_s=120, init_method=f"file://{out}/rendezvous")
        geo = Geometry(2, 1, 2)
        trainer = make(tiny, "dflash", geo, dist_ctx=ctx, parallel="ddp")
        metrics: list[dict] = []
        trainer.run(InProcessSteps(dflash_samples(tiny), geo, rank=rank), max_steps=3,
                    on_step=lambda _s, m: metrics.append(m))
        if rank == 0:
            torch.save({"losses": [m["loss"] for m in metrics],
                        "accept": [m["acceptance_length"] for m in metrics]},
                       Path(out) / "rank0.pt")
        dist.barrier()

    run_rank(body)


def test_two_ranks_match_one(tiny, tmp_path: Path) -> None:
    """Anchors are drawn per row from the step and the row's place in it, and the loss is
    normalised over the whole step, so the rank layout changes nothing."""
    mp.spawn(_rank_main, args=(tiny, str(tmp_path)), nprocs=2, join=True)
    single = train(make(tiny, "dflash", Geometry(1, 1, 4)), dflash_samples(tiny),
                   Geometry(1, 1, 4), 3)
    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert two["losses"] == pytest.approx([m["loss"] for m in single], rel=1e-5)
    assert two["accept"] == pytest.approx([m["acceptance_length"] for m in single], rel=1e-6)
