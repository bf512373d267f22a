"""The work loop with an engine that writes features itself: the real sglang engine (HTTP mode)
against a stand-in SGLang server running the real capture plugin, a real coordinator and store.

Only SGLang is replaced (it cannot run here); the plugin, the engine, the work loop, the
coordinator and the store are the real ones.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import producer.sglang_plugin as plugin
from producer.dataprep import messages_from_conversation, prepare_prompt
from producer.engines.base import EngineConfig
from producer.engines.sglang import SGLangEngine, SGLangOptions
from producer.service import ProducerConfig, ProducerProcess
from producer.vocab import describe_run, run_config_proto
from producer.worker import WorkerConfig
from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.capture import CapturePlan
from services.config import RunConfigFile
from services.dataset import parse_line, prompt_id
from services.rpc.server import ServerConfig
from services.store.memory import MemoryStore
from tests.producer.helpers import create_run, lines, make_producer, read_all_steps, status
from tests.sglang import fakes
from tests.sglang.conftest import install_on_fakes
from tests.sglang.http_server import FakeSGLangServer

EAGLE3_TENSORS = ("input_ids", "loss_mask", "aux_hidden_state", "hidden_state")
DFLASH_LAYERS = [0, 2, 5]


@pytest.fixture
def sglang(llama_dir: Path) -> Iterator[tuple[FakeSGLangServer, SGLangEngine, MemoryStore]]:
    store = MemoryStore(f"sg-{uuid.uuid4().hex[:8]}", store_id="mem")
    install_on_fakes(store)
    try:
        with FakeSGLangServer(128, [1, 3, 4]) as server:
            engine = SGLangEngine(EngineConfig(model_path=str(llama_dir)),
                                  SGLangOptions(store=store, server_urls=(server.url,)))
            yield server, engine, store
            engine.close()
    finally:
        plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)


def test_refs_get_the_producers_loss_mask(stub, llama_dir: Path, llama_tokenizer,
                                          sglang) -> None:
    server, engine, store = sglang
    rows = lines(6)
    run = create_run(stub, llama_dir, rows)
    stats = make_producer(stub, store, engine, llama_dir, run, lease_batch=4).run()
    assert stats.samples_committed == 6 and stats.prompts_failed == 0
    assert len(server.bodies) == 1 + 6  # the engine's start-up probe, then one per prompt
    convs = {prompt_id(parse_line(r)): parse_line(r) for r in rows}
    samples = read_all_steps(stub, run, store)
    assert len(samples) == 6
    for ref, tensors in samples:
        assert [t.name for t in ref.tensors] == list(EAGLE3_TENSORS)
        prompt = prepare_prompt(llama_tokenizer, messages_from_conversation(
            convs[ref.prompt_id]), 96)
        assert torch.equal(tensors["input_ids"], prompt.input_ids)
        assert torch.equal(tensors["loss_mask"], prompt.loss_mask)
        assert tensors["aux_hidden_state"].shape == (prompt.num_tokens, 3 * 128)
        assert tensors["hidden_state"].shape == (prompt.num_tokens, 128)


def test_refused_captures_fail_their_prompts(stub, llama_dir: Path, sglang) -> None:
    server, engine, store = sglang
    server.mode = "wrong_length"
    run = create_run(stub, llama_dir, lines(3))
    stats = make_producer(stub, store, engine, llama_dir, run).run()
    assert stats.samples_committed == 0 and stats.prompts_failed == 3
    assert status(stub).prompts["DEAD"] == 3


def test_producer_process_runs_the_sglang_engine(coordinator, stub, llama_dir: Path,
                                                 sglang) -> None:
    server, _engine, store = sglang
    run = create_run(stub, llama_dir, lines(4))
    proc = ProducerProcess(ProducerConfig(
        coordinator=f"127.0.0.1:{coordinator.port}", run_id=run.run_id,
        store_url=f"memory://{store.name}?store_id=mem", engine="sglang",
        sglang_urls=(server.url,), server=ServerConfig(listen="127.0.0.1:0"),
        worker=WorkerConfig(run_id=run.run_id, exit_when_captured=True)))
    try:
        stats = proc.wait(timeout=120)
    finally:
        proc.stop(grace=0.5)
    assert stats is not None and stats.samples_committed == 4
    assert proc.engine.name == "sglang"
    assert status(stub).prompts["CAPTURED"] == 4


def create_dflash_run(stub, model_dir: Path, dataset: list[str], algorithm: str) -> cpb.Run:
    """A DFlash-family run, created the way `draftflow run create` does."""
    draft: dict = {"algorithm": algorithm, "dflash": {"target_layer_ids": DFLASH_LAYERS}}
    if algorithm == "domino":
        draft["domino"] = {"emb_dim": 16, "gru_hidden_dim": 32}
    cfg = RunConfigFile.model_validate({
        "run_id": "r1", "dataset": "conversations.jsonl", "epochs": 1,
        "target": {"model_path": str(model_dir), "revision": "tiny"},
        "capture": {"max_length": 96}, "draft": draft,
        "lease": {"lease_seconds": 30, "heartbeat_seconds": 1, "heartbeat_misses": 2,
                  "max_attempts": 3},
        "watermark": {"high_samples": 0, "low_samples": 0},
    })
    facts = describe_run(model_dir, cfg, dataset)
    return stub.CreateRun(cpb.CreateRunRequest(
        run_id="r1", config=run_config_proto(cfg, facts), dataset_lines=dataset,
        vocab_map=facts.vocab_map)).run


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_a_dflash_run_commits_the_plans_tensors(stub, llama_dir: Path, llama_tokenizer,
                                                algorithm: str) -> None:
    """The work loop with the sglang engine on a DFlash-family run: refs hold input_ids,
    loss_mask and hidden_states (the plan's layers, no final state) in plan order."""
    store = MemoryStore(f"sg-{uuid.uuid4().hex[:8]}", store_id="mem")
    install_on_fakes(store)
    rows = lines(4)
    try:
        args = fakes.capture_server_args(DFLASH_LAYERS, "dflash")
        with FakeSGLangServer(128, DFLASH_LAYERS, server_args=args) as server:
            run = create_dflash_run(stub, llama_dir, rows, algorithm)
            assert list(run.config.capture.aux_layer_ids) == DFLASH_LAYERS
            engine = SGLangEngine(
                EngineConfig(model_path=str(llama_dir),
                             aux_layer_ids=tuple(run.config.capture.aux_layer_ids),
                             algorithm=run.config.draft.algorithm),
                SGLangOptions(store=store, server_urls=(server.url,)))
            try:
                stats = make_producer(stub, store, engine, llama_dir, run).run()
            finally:
                engine.close()
    finally:
        plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)
    assert stats.samples_committed == 4 and stats.prompts_failed == 0
    plan = CapturePlan(tuple(DFLASH_LAYERS), "hidden_states", final_hidden=False)
    assert engine.plan == plan
    convs = {prompt_id(parse_line(r)): parse_line(r) for r in rows}
    samples = read_all_steps(stub, run, store)
    assert len(samples) == 4
    for ref, tensors in samples:
        assert [t.name for t in ref.tensors] == list(plan.tensors)
        assert ref.capture == plan.to_proto()
        assert ref.meta["engine"] == "sglang"
        prompt = prepare_prompt(llama_tokenizer, messages_from_conversation(
            convs[ref.prompt_id]), 96)
        ids = prompt.input_ids.tolist()
        assert torch.equal(tensors["input_ids"], prompt.input_ids)
        assert torch.equal(tensors["loss_mask"], prompt.loss_mask)
        assert sorted(tensors) == sorted(plan.tensors)
        assert tensors["hidden_states"].shape == (prompt.num_tokens, 3 * 128)
        assert tensors["hidden_states"].equal(
            fakes.synthetic_features(ids, 128, DFLASH_LAYERS)[0])
        assert not any(t.key.endswith("/hidden_state") for t in ref.tensors)
        assert ref.tensors[2].dtype == common_pb2.DTYPE_BFLOAT16
