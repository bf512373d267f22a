"""SGLang capture on a GPU: the plugin's device path, and features against the hf engine.

Needs CUDA (all tests) and SGLang >= 0.5.23 with draftflow installed in the same environment, so
SGLang's scheduler processes load the plugin from the entry point (the end-to-end test). Run on
a GPU machine:

    pip install -e '.[sglang,mooncake,test]'
    pytest -q -rs tests/gpu/test_sglang_e2e.py

Each test is skipped, with its reason, where what it needs is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.sglang import fakes
from tests.sglang.conftest import AUX_LAYERS, HIDDEN, install_on_fakes

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sglang_missing() -> str:
    if importlib.util.find_spec("sglang") is None:
        return "SGLang is not installed (pip install 'draftflow[sglang]')"
    entry = [
        ep
        for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")
        if ep.value == "producer.sglang_plugin:register"
    ]
    if not entry:
        return (
            "draftflow is not installed in this environment (pip install -e .), so SGLang "
            "would not load the capture plugin"
        )
    return ""


needs_sglang = pytest.mark.skipif(bool(_sglang_missing()), reason=_sglang_missing() or "ok")


@pytest.fixture
def hooked() -> Iterator[None]:
    import producer.sglang_plugin as plugin

    yield
    plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)


@needs_cuda
def test_the_plugin_copies_device_rows_through_page_locked_memory(hooked) -> None:
    from services.store import open_store

    store = open_store("memory://gpu-plugin?store_id=st")
    hooks = install_on_fakes(store, staging_bytes=1 << 20)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS, device="cuda")
    prompts = {"a": list(range(1, 300)), "b": [5, 6, 7]}
    from producer.sglang_plugin import wire
    from tests.sglang.test_plugin import capture_body

    responses = scheduler.run([capture_body(k, v) for k, v in prompts.items()])

    assert hooks._staging is not None and hooks._staging.buffer.is_pinned()
    for response, ids in zip(responses, prompts.values(), strict=True):
        ref = wire.ref_from_meta_info(response["meta_info"])
        assert ref["ok"] is True, ref
        got = store.get_sample([wire.spec_from_wire(t) for t in ref["tensors"]])
        aux, hidden = fakes.synthetic_features(ids, HIDDEN, AUX_LAYERS)
        assert got["aux_hidden_state"].equal(aux) and got["hidden_state"].equal(hidden)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


@needs_cuda
@needs_sglang
def test_sglang_features_match_the_hf_engine_and_train(tmp_path: Path) -> None:
    from producer.engines.base import EngineConfig
    from producer.engines.hf import HFEngine
    from producer.engines.sglang import CapturedRef, CaptureItem, SGLangEngine, SGLangOptions
    from services.store import open_store
    from services.store.mooncake_proc import start_master
    from services.tiny_model import build_tiny_target
    from trainer.config import TrainerConfig
    from trainer.loop import build_trainer
    from trainer.steps import Geometry, InProcessSteps

    target = build_tiny_target(
        tmp_path / "target", num_layers=8, hidden_size=256, vocab_size=2048, seed=0
    )
    aux = (1, 3, 4)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 2048, (n,), generator=gen).tolist() for n in (17, 64, 5, 130)]

    master = start_master()
    try:
        url = master.url("e2e", segment_mb=256, buffer_mb=128)
        store = open_store(url)
        config = EngineConfig(model_path=str(target), dtype="bfloat16", aux_layer_ids=aux)
        engine = SGLangEngine(
            config,
            SGLangOptions(
                store=store,
                store_url=url,
                engine_kwargs={"mem_fraction_static": 0.3, "log_level": "warning"},
            ),
        )
        try:
            outcomes = engine.capture_to_store(
                [CaptureItem("e2e", f"s{i}", 0, tuple(p)) for i, p in enumerate(prompts)]
            )
        finally:
            engine.close()
        assert all(isinstance(o, CapturedRef) for o in outcomes), outcomes
        sglang_features = [store.get_sample(list(o.tensors)) for o in outcomes]

        with HFEngine(
            EngineConfig(model_path=str(target), device="cuda", dtype="bfloat16", aux_layer_ids=aux)
        ) as hf:
            hf_features = hf.capture(prompts)

        for got, want, ids in zip(sglang_features, hf_features, prompts, strict=True):
            assert got["input_ids"].tolist() == ids
            # Different attention kernels in bf16: compare by relative norm, not bitwise.
            assert _relative_error(got["aux_hidden_state"], want.aux_hidden_state.cpu()) < 2e-2
            assert _relative_error(got["hidden_state"], want.hidden_state.cpu()) < 2e-2

        samples = []
        for got in sglang_features:
            n = got["input_ids"].numel()
            mask = torch.zeros(n, dtype=torch.uint8)
            mask[n // 2 :] = 1
            samples.append(
                {
                    "input_ids": got["input_ids"],
                    "loss_mask": mask,
                    "aux_hidden_state": got["aux_hidden_state"].float(),
                    "hidden_state": got["hidden_state"].float(),
                }
            )
        trainer = build_trainer(
            TrainerConfig(learning_rate=1e-3, geometry=Geometry(1, 2, 1), ttt_length=2),
            target,
            list(range(256)),
            list(aux),
            parallel="none",
        )
        last = trainer.run(InProcessSteps(samples, Geometry(1, 2, 1)), max_steps=2)
        assert last == 2
        store.close()
    finally:
        master.stop()


@needs_cuda
def test_dflash_rows_go_from_the_device_to_the_store_without_the_final_state(hooked) -> None:
    from producer.sglang_plugin import wire
    from services.store import open_store
    from tests.sglang.test_dflash import LAYERS, dflash_body

    store = open_store("memory://gpu-plugin-dflash?store_id=st")
    hooks = install_on_fakes(store, staging_bytes=1 << 20)
    scheduler = fakes.FakeScheduler(HIDDEN, LAYERS, device="cuda", capture="dflash")
    prompts = {"a": list(range(1, 300)), "b": [5, 6, 7]}

    responses = scheduler.run([dflash_body(k, v) for k, v in prompts.items()])

    assert hooks._staging is not None and hooks._staging.buffer.is_pinned()
    for response, ids in zip(responses, prompts.values(), strict=True):
        ref = wire.ref_from_meta_info(response["meta_info"])
        assert ref["ok"] is True, ref
        assert [t["name"] for t in ref["tensors"]] == ["input_ids", "hidden_states"]
        got = store.get_sample([wire.spec_from_wire(t) for t in ref["tensors"]])
        assert got["hidden_states"].equal(fakes.synthetic_features(ids, HIDDEN, LAYERS)[0])


@needs_cuda
@needs_sglang
@pytest.mark.parametrize(("arch", "layers"), [("llama", (0, 2, 5)), ("qwen3", (1, 5))])
def test_sglang_dflash_features_match_the_hf_engine(tmp_path: Path, arch: str, layers) -> None:
    """A DFlash plan through real SGLang: hidden_states holds the outputs of the plan's layers
    (id i = output of layer i, HF's hidden_states[i + 1]) as the hf engine captures them, and
    no final state is written."""
    from producer.engines.base import EngineConfig
    from producer.engines.hf import HFEngine
    from producer.engines.sglang import CapturedRef, CaptureItem, SGLangEngine, SGLangOptions
    from services.store import open_store
    from services.store.mooncake_proc import start_master
    from services.tiny_model import build_tiny_target

    target = build_tiny_target(
        tmp_path / "target", arch=arch, num_layers=8, hidden_size=256, vocab_size=2048, seed=0
    )
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, 2048, (n,), generator=gen).tolist() for n in (17, 64, 5, 130)]

    master = start_master()
    try:
        url = master.url("e2e-dflash", segment_mb=256, buffer_mb=128)
        store = open_store(url)
        config = EngineConfig(
            model_path=str(target), dtype="bfloat16", aux_layer_ids=layers, algorithm="dflash"
        )
        engine = SGLangEngine(
            config,
            SGLangOptions(
                store=store,
                store_url=url,
                engine_kwargs={"mem_fraction_static": 0.3, "log_level": "warning"},
            ),
        )
        try:
            outcomes = engine.capture_to_store(
                [CaptureItem("e2e-dflash", f"s{i}", 0, tuple(p)) for i, p in enumerate(prompts)]
            )
        finally:
            engine.close()
        assert all(isinstance(o, CapturedRef) for o in outcomes), outcomes
        for outcome in outcomes:
            assert [t.name for t in outcome.tensors] == ["input_ids", "hidden_states"]
        sglang_features = [store.get_sample(list(o.tensors)) for o in outcomes]

        with HFEngine(
            EngineConfig(
                model_path=str(target),
                device="cuda",
                dtype="bfloat16",
                aux_layer_ids=layers,
                algorithm="dflash",
            )
        ) as hf:
            hf_features = hf.capture(prompts)

        for got, want, ids in zip(sglang_features, hf_features, prompts, strict=True):
            assert got["input_ids"].tolist() == ids
            assert want.hidden_state is None
            assert got["hidden_states"].shape == (len(ids), len(layers) * 256)
            assert _relative_error(got["hidden_states"], want.aux_hidden_state.cpu()) < 2e-2
            # Block by block: each layer's rows sit where the plan puts them.
            for k in range(len(layers)):
                block = slice(k * 256, (k + 1) * 256)
                assert (
                    _relative_error(
                        got["hidden_states"][:, block], want.aux_hidden_state.cpu()[:, block]
                    )
                    < 2e-2
                )
        store.close()
    finally:
        master.stop()
