"""The plugin's hooks on SGLang's prefill path: what is written, what comes back, and failures."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import producer.sglang_plugin as plugin
from producer.sglang_plugin import gate, wire
from producer.sglang_plugin.writer import SampleWrite
from services.api import common_pb2
from services.store.base import StoreFull
from services.tensors import make_key
from tests.sglang import fakes
from tests.sglang.conftest import AUX_LAYERS, HIDDEN, DictStore, absent, install_on_fakes


def capture_body(sample_id: str, ids: list[int], *, store_id: str = "st") -> dict[str, Any]:
    target = wire.CaptureTarget(store_id, "run1", sample_id, 0)
    return {
        "rid": f"rid-{sample_id}",
        "input_ids": ids,
        "sampling_params": {
            "max_new_tokens": 1,
            "temperature": 0.0,
            "ignore_eos": True,
            "custom_params": {wire.REQUEST_KEY: target.to_params()},
        },
        "return_hidden_states": True,
        "cache_salt": f"rid-{sample_id}",
    }


def plain_body(rid: str, ids: list[int]) -> dict[str, Any]:
    return {
        "rid": rid,
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 1},
        "return_hidden_states": True,
    }


def keys_of(sample_id: str) -> list[str]:
    return [make_key("st", "run1", sample_id, 0, n) for n in wire.PLUGIN_TENSORS]


def test_capture_requests_write_features_and_answer_with_refs(store, hooked) -> None:
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10], "c": [11, 12, 13]}
    bodies = [capture_body(s, ids) for s, ids in prompts.items()]
    bodies.insert(1, plain_body("plain", [1, 2, 3]))

    responses = scheduler.run(bodies)

    plain = responses[1]["meta_info"]
    # As in SGLang, a request without the key gets padding when a batch-mate has one.
    assert plain.get(wire.RESPONSE_KEY, [None]) == [None]
    expected_aux, _ = fakes.synthetic_features([1, 2, 3], HIDDEN, AUX_LAYERS)
    assert torch.tensor(plain["hidden_states"][0]).to(torch.bfloat16).equal(expected_aux)

    for body, response in zip(
        [b for b in bodies if b["rid"] != "plain"],
        [r for r in responses if r["meta_info"]["id"] != "plain"],
        strict=True,
    ):
        ids = body["input_ids"]
        ref = wire.ref_from_meta_info(response["meta_info"])
        assert ref["ok"] is True, ref
        # The float rows never enter the response: only the ref does.
        assert response["meta_info"]["hidden_states"] == []
        assert (ref["num_tokens"], ref["prompt_tokens"], ref["aux_layer_ids"]) == (
            len(ids),
            len(ids),
            AUX_LAYERS,
        )
        specs = [wire.spec_from_wire(t) for t in ref["tensors"]]
        assert [s.name for s in specs] == list(wire.PLUGIN_TENSORS)
        assert [s.key for s in specs] == keys_of(ref["sample_id"])
        assert [list(s.shape) for s in specs] == [
            [len(ids)],
            [len(ids), 3 * HIDDEN],
            [len(ids), HIDDEN],
        ]
        got = store.get_sample(specs)
        aux, hidden = fakes.synthetic_features(ids, HIDDEN, AUX_LAYERS)
        assert got["input_ids"].tolist() == ids
        assert got["aux_hidden_state"].equal(aux)
        assert got["hidden_state"].equal(hidden)


class CountingBatchStore(DictStore):
    """A store with a batched put and registered memory: records batches and source bytes."""

    def __init__(self) -> None:
        super().__init__("st")
        self.batches: list[list[str]] = []
        self.handed_out: list[torch.Tensor] = []
        self.source_ptrs: list[int] = []

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(tuple(shape), dtype=dtype)
        self.handed_out.append(tensor)
        return tensor

    def put_samples(self, samples: Sequence[SampleWrite]) -> list[list[common_pb2.TensorSpec]]:
        self.batches.append([s.sample_id for s in samples])
        self.source_ptrs.extend(t.data_ptr() for s in samples for t in s.tensors.values())
        return [self.put_sample(s.run_id, s.sample_id, s.generation, s.tensors) for s in samples]


def inside(ptr: int, buffer: torch.Tensor) -> bool:
    return buffer.data_ptr() <= ptr < buffer.data_ptr() + buffer.numel()


def test_one_batched_put_per_scheduler_batch_from_one_reused_registered_buffer(hooked) -> None:
    store = CountingBatchStore()
    hooks = install_on_fakes(store, staging_bytes=1 << 12)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)

    scheduler.run([capture_body("a", [1, 2, 3]), capture_body("b", [4, 5])])
    scheduler.run([capture_body("c", [6, 7, 8, 9])])

    assert store.batches == [["a", "b"], ["c"]]
    staging = hooks._staging
    assert staging is not None and len(store.handed_out) == 1
    assert staging.buffer.data_ptr() == store.handed_out[0].data_ptr()
    assert all(inside(p, staging.buffer) for p in store.source_ptrs)


def test_a_batch_larger_than_the_buffer_grows_it_from_registered_memory(hooked) -> None:
    store = CountingBatchStore()
    hooks = install_on_fakes(store, staging_bytes=256)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)

    [response] = scheduler.run([capture_body("a", list(range(1, 40)))])

    assert wire.ref_from_meta_info(response["meta_info"])["ok"] is True
    assert hooks._staging is not None and hooks._staging.capacity > 256
    assert len(store.handed_out) == 2
    assert hooks._staging.buffer.data_ptr() == store.handed_out[1].data_ptr()


def test_the_response_is_sent_only_after_the_put_completed(hooked) -> None:
    store = DictStore("st")
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)
    seen_at_send: list[bool] = []
    sender = scheduler.streamer.send_to_detokenizer
    original_send = sender.send_output

    def send_output(output: Any, recv_obj: object | None = None) -> None:
        seen_at_send.append(all(k in store.data for k in keys_of("a")))
        original_send(output, recv_obj)

    sender.send_output = send_output  # type: ignore[method-assign]
    scheduler.run([capture_body("a", [1, 2, 3])])

    assert seen_at_send == [True]


class FailingStore(DictStore):
    """Accepts ``fail_after`` samples, then raises ``error`` (a partial batch was written)."""

    def __init__(self, fail_after: int, error: Exception) -> None:
        super().__init__("st")
        self.fail_after = fail_after
        self.error = error
        self.samples = 0

    def put_sample(self, run_id, sample_id, generation, tensors):  # type: ignore[no-untyped-def]
        if self.samples >= self.fail_after:
            # Part of this sample lands before the failure, as with a torn batch transfer.
            first = next(iter(tensors))
            super().put_sample(run_id, sample_id, generation, {first: tensors[first]})
            raise self.error
        self.samples += 1
        return super().put_sample(run_id, sample_id, generation, tensors)


def test_a_failed_write_removes_every_key_of_the_batch_and_fails_each_request(hooked) -> None:
    store = FailingStore(fail_after=1, error=StoreFull("pool exhausted"))
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)

    responses = scheduler.run(
        [capture_body("a", [1, 2]), capture_body("b", [3, 4]), capture_body("c", [5])]
    )

    assert store.data == {}
    assert set(store.removed) == {k for s in "abc" for k in keys_of(s)}
    for response in responses:
        ref = wire.ref_from_meta_info(response["meta_info"])
        assert ref["ok"] is False and ref["retryable"] is True
        assert "pool exhausted" in ref["error"] and "keys were removed" in ref["error"]


def test_a_malformed_tensor_is_a_non_retryable_failure(hooked) -> None:
    store = FailingStore(fail_after=0, error=ValueError("bad dtype"))
    install_on_fakes(store)
    [response] = fakes.FakeScheduler(HIDDEN, AUX_LAYERS).run([capture_body("a", [1, 2])])
    ref = wire.ref_from_meta_info(response["meta_info"])
    assert ref["ok"] is False and ref["retryable"] is False


def test_a_partial_forward_is_refused_and_nothing_is_written(store, hooked) -> None:
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS, cached_prefix=2)

    [response] = scheduler.run([capture_body("a", [1, 2, 3, 4])])

    ref = wire.ref_from_meta_info(response["meta_info"])
    assert ref["ok"] is False and ref["retryable"] is False
    assert "covered 2 of the prompt's 4 tokens" in ref["error"]
    assert absent(store, "a", 4)


def test_a_request_for_another_store_is_refused(store, hooked) -> None:
    install_on_fakes(store)
    [response] = fakes.FakeScheduler(HIDDEN, AUX_LAYERS).run(
        [capture_body("a", [1, 2], store_id="elsewhere")]
    )
    ref = wire.ref_from_meta_info(response["meta_info"])
    assert ref["ok"] is False and ref["retryable"] is False
    assert "'elsewhere'" in ref["error"] and "DRAFTFLOW_STORE_URL" in ref["error"]


def test_a_malformed_target_is_refused_without_breaking_the_batch(store, hooked) -> None:
    install_on_fakes(store)
    bad = capture_body("a", [1, 2])
    bad["sampling_params"]["custom_params"][wire.REQUEST_KEY]["generation"] = -1
    responses = fakes.FakeScheduler(HIDDEN, AUX_LAYERS).run([bad, capture_body("b", [3, 4])])
    first = wire.ref_from_meta_info(responses[0]["meta_info"])
    assert first["ok"] is False and "generation" in first["error"]
    assert wire.ref_from_meta_info(responses[1]["meta_info"])["ok"] is True


def test_only_the_rank_that_sends_responses_writes(hooked) -> None:
    store = DictStore("st")
    install_on_fakes(store)
    follower = fakes.FakeScheduler(HIDDEN, AUX_LAYERS, sends=False)
    follower.run([capture_body("a", [1, 2, 3]), plain_body("p", [4, 5])])
    assert store.data == {}

    leader = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)
    leader.run([capture_body("a", [1, 2, 3])])
    assert sorted(store.data) == sorted(keys_of("a"))


def test_rows_kept_for_a_batch_that_never_streamed_are_dropped(store, hooked) -> None:
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)
    batch, result = scheduler.build([capture_body("a", [1, 2]), capture_body("b", [3, 4])])
    # SGLang fails half-way through the batch, after the first request's rows were kept.
    result.extend_input_len_per_req = result.extend_input_len_per_req[:1]

    with pytest.raises(IndexError):
        scheduler.processor.process_batch_result_prefill(batch, result)

    ref = batch.reqs[0].customized_info[wire.RESPONSE_KEY][0]
    assert ref["ok"] is False and "before its responses were streamed" in ref["error"]
    # The next batch starts clean and writes only its own sample.
    scheduler.run([capture_body("c", [5, 6])])
    assert all("/a/" not in k for k in getattr(store, "data", {}))


# -- the gate --------------------------------------------------------------------------------


def test_an_sglang_older_than_the_capture_mode_is_refused(hooked) -> None:
    with pytest.raises(gate.IncompatibleSGLang, match=r"sglang>=0\.5\.23"):
        plugin.install(
            fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer, version="0.5.22"
        )


def test_a_changed_signature_is_refused_and_nothing_is_wrapped(hooked, monkeypatch) -> None:
    def changed(
        self,
        *,
        req,
        logits_output,
        hidden_state_offset,
        capture_hidden_mode,  # type: ignore[no-untyped-def]
        extend_input_len,
        store=True,
        stream=None,
    ):
        return 0

    cls = fakes.SchedulerBatchResultProcessor
    monkeypatch.setattr(cls, "_append_prefill_hidden_states", changed)
    with pytest.raises(
        gate.IncompatibleSGLang, match=r"_append_prefill_hidden_states has signature .*stream=None"
    ):
        plugin.install(cls, fakes.SchedulerOutputStreamer, version="0.5.23")
    assert not hasattr(cls.process_batch_result_prefill, "__wrapped__")
    assert not hasattr(fakes.SchedulerOutputStreamer.stream_output, "__wrapped__")


def test_a_newer_version_with_the_same_signatures_installs(store, hooked, caplog) -> None:
    plugin.install(
        fakes.SchedulerBatchResultProcessor,
        fakes.SchedulerOutputStreamer,
        version="0.5.24",
        hooks=plugin.CaptureHooks(lambda: store),
    )
    assert "newer than the versions" in caplog.text


def test_installing_twice_is_refused_and_uninstall_restores(store, hooked) -> None:
    original = fakes.SchedulerBatchResultProcessor.__dict__["_append_prefill_hidden_states"]
    install_on_fakes(store)
    with pytest.raises(RuntimeError, match="already installed"):
        install_on_fakes(store)
    plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)
    assert fakes.SchedulerBatchResultProcessor.__dict__["_append_prefill_hidden_states"] is original


def test_a_batch_beyond_the_registered_memory_fails_retryably_and_the_next_one_works(
    hooked,
) -> None:
    store = CountingBatchStore()
    store.config = SimpleNamespace(buffer_mb=2)  # type: ignore[attr-defined]
    hooks = install_on_fakes(store, staging_bytes=64 << 20)
    scheduler = fakes.FakeScheduler(HIDDEN, AUX_LAYERS)
    assert hooks._staging is None

    [big] = scheduler.run([capture_body("big", [1 + i % 60 for i in range(9000)])])
    [small] = scheduler.run([capture_body("small", [1, 2, 3])])

    ref = wire.ref_from_meta_info(big["meta_info"])
    assert ref["ok"] is False and ref["retryable"] is True
    assert "raise buffer_mb" in ref["error"]
    assert wire.ref_from_meta_info(small["meta_info"])["ok"] is True
    # Started at half the registered memory, not at the 64 MiB asked for.
    assert hooks._staging is not None and hooks._staging.capacity == 1 << 20
