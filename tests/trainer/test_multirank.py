"""Two gloo ranks on disjoint slices match one rank on the same global batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.trainer.helpers import make_trainer, run_rank, trainable_state
from trainer.parallel import init_distributed
from trainer.steps import Geometry, InProcessSteps

STEPS = 3


def _rank_main(rank: int, mode: str, tiny, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def body() -> None:
        # A file rendezvous: no port to race for on a shared machine.
        ctx = init_distributed("cpu", timeout_s=120, init_method=f"file://{out}/rendezvous")
        geo = Geometry(2, 1, 2)
        trainer = make_trainer(tiny, geometry=geo, dist_ctx=ctx, parallel=mode,
                               checkpoint_dir=Path(out) / "ck", checkpoint_every=STEPS)
        metrics = []
        trainer.run(InProcessSteps(tiny.train, geo, rank=rank), max_steps=STEPS,
                    on_step=lambda _s, m: metrics.append(m["loss"]))
        if rank == 0:
            torch.save({"losses": metrics}, Path(out) / "rank0.pt")
        dist.barrier()

    run_rank(body)


def test_two_ranks_match_one(tiny, tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=("ddp", tiny, str(tmp_path)), nprocs=2, join=True)

    single = make_trainer(tiny, geometry=Geometry(1, 1, 4))
    losses = []
    single.run(InProcessSteps(tiny.train, Geometry(1, 1, 4)), max_steps=STEPS,
               on_step=lambda _s, m: losses.append(m["loss"]))

    two = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert two["losses"] == pytest.approx(losses, rel=1e-5)
    # The two-rank checkpoint (gathered full state) holds the same weights as one rank.
    ck = torch.load(tmp_path / "ck" / f"step-{STEPS:09d}" / "state.pt", weights_only=True)
    expected = trainable_state(single)
    assert ck["model"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ck["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
