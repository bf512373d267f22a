"""Regenerating assistant turns with the target: the sequence captured, seeding, and the work
loop of a run that regenerates, on a tiny target and a real coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from producer.dataprep import parse_row, prepare_prompt
from producer.engines.base import CaptureEngine, EngineError
from producer.regenerate import Regenerated, regenerate, sample_seed
from services.api import run_pb2
from services.store.memory import MemoryStore
from tests.producer.helpers import create_run, lines, make_producer, read_all_steps, status

MULTI_TURN = 21  # a row of the example dataset with three assistant turns
GREEDY = run_pb2.RegenerateConfig(mode="greedy", max_new_tokens=12, on_truncation="keep")
SAMPLE = run_pb2.RegenerateConfig(mode="sample", temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=12, seed=3, on_truncation="keep")


def _regenerate(engine: CaptureEngine, tokenizer: Any, row: str,
                settings: run_pb2.RegenerateConfig, seed: int = 0,
                max_length: int = 256) -> Regenerated:
    def generate(ids: list[int], n: int, turn_seed: int) -> list[int]:
        return engine.generate(ids, settings=settings, max_new_tokens=n, seed=turn_seed)

    return regenerate(generate, tokenizer, parse_row(row), settings=settings,
                      max_length=max_length, seed=seed, stop_token_ids=engine.stop_token_ids)


def _spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    m = [0, *mask.tolist(), 0]
    starts = [i for i in range(len(m) - 1) if m[i] == 0 and m[i + 1] == 1]
    ends = [i for i in range(len(m) - 1) if m[i] == 1 and m[i + 1] == 0]
    return list(zip(starts, ends, strict=True))


def test_greedy_turns_are_the_targets_own_greedy_continuations(engine, llama_tokenizer) -> None:
    row = lines(MULTI_TURN + 1)[MULTI_TURN]
    out = _regenerate(engine, llama_tokenizer, row, GREEDY)
    ids = out.prompt.input_ids
    spans = _spans(out.prompt.loss_mask)
    assert len(out.turns) == len(spans) == 3
    for (start, _end), turn in zip(spans, out.turns, strict=True):
        # Each turn continues the sequence as regenerated so far, exactly as generate() would.
        prefix = ids[:start].unsqueeze(0)
        with torch.inference_mode():
            reference = engine.model.generate(
                prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                max_new_tokens=GREEDY.max_new_tokens, pad_token_id=0)[0, start:].tolist()
        assert list(turn.token_ids) == reference
        # The capture sees exactly the generated ids.
        assert ids[start:start + len(reference)].tolist() == reference


def test_regenerated_answers_differ_from_the_datasets(engine, llama_tokenizer) -> None:
    for row in lines(4):
        out = _regenerate(engine, llama_tokenizer, row, GREEDY)
        original = prepare_prompt(llama_tokenizer, parse_row(row), max_length=256)
        ours = out.prompt.input_ids[out.prompt.loss_mask.bool()].tolist()
        theirs = original.input_ids[original.loss_mask.bool()].tolist()
        assert ours != theirs
        # System and user turns are kept: the text before the first answer is the same.
        first = _spans(original.loss_mask)[0][0]
        assert out.prompt.input_ids[:first].tolist() == original.input_ids[:first].tolist()


def test_sampling_is_fixed_by_the_seed_alone(engine, llama_tokenizer) -> None:
    row = lines(1)[0]
    a = _regenerate(engine, llama_tokenizer, row, SAMPLE, seed=11)
    torch.manual_seed(12345)  # other randomness does not move the samples
    b = _regenerate(engine, llama_tokenizer, row, SAMPLE, seed=11)
    c = _regenerate(engine, llama_tokenizer, row, SAMPLE, seed=12)
    assert a.turns == b.turns and torch.equal(a.prompt.input_ids, b.prompt.input_ids)
    assert a.turns != c.turns


def test_seed_depends_on_the_epoch_only_when_per_epoch() -> None:
    once = run_pb2.RegenerateConfig(seed=1)
    every = run_pb2.RegenerateConfig(seed=1, per_epoch=True)
    assert sample_seed(once, "p", 0) == sample_seed(once, "p", 1)
    assert sample_seed(every, "p", 0) != sample_seed(every, "p", 1)
    assert sample_seed(once, "p", 0) != sample_seed(once, "q", 0)
    assert sample_seed(once, "p", 0) != sample_seed(run_pb2.RegenerateConfig(seed=2), "p", 0)


def test_given_turns_are_reused_without_generating(engine, llama_tokenizer) -> None:
    row = lines(MULTI_TURN + 1)[MULTI_TURN]
    first = _regenerate(engine, llama_tokenizer, row, SAMPLE, seed=5)

    def refuse(ids: list[int], n: int, seed: int) -> list[int]:
        raise AssertionError("generated although every turn was given")

    again = regenerate(refuse, llama_tokenizer, parse_row(row), settings=SAMPLE,
                       max_length=256, seed=99, stop_token_ids=engine.stop_token_ids,
                       given=first.turns)
    assert again.reused and again.turns == first.turns
    assert torch.equal(again.prompt.input_ids, first.prompt.input_ids)
    assert torch.equal(again.prompt.loss_mask, first.prompt.loss_mask)


def test_turns_stop_at_max_length(engine, llama_tokenizer) -> None:
    row = lines(MULTI_TURN + 1)[MULTI_TURN]
    whole = _regenerate(engine, llama_tokenizer, row, GREEDY)
    second = _spans(whole.prompt.loss_mask)[1][0]
    out = _regenerate(engine, llama_tokenizer, row, GREEDY, max_length=second + 3)
    assert out.prompt.num_tokens == second + 3 and out.prompt.truncated
    assert len(out.turns) == 2 and out.turns[1].truncated
    assert len(out.turns[1].token_ids) == 3


def test_a_stop_token_ends_the_turn_and_the_template_closes_it(llama_tokenizer) -> None:
    end = llama_tokenizer.convert_tokens_to_ids("<|end|>")
    word = llama_tokenizer("hello", add_special_tokens=False)["input_ids"]

    def generate(ids: list[int], n: int, seed: int) -> list[int]:
        return [*word, end]

    messages = parse_row(lines(1)[0])
    out = regenerate(generate, llama_tokenizer, messages, settings=GREEDY, max_length=256,
                     seed=0, stop_token_ids=[end])
    assert out.messages[-1] == {"role": "assistant", "content": "hello"}
    assert not out.turns[0].truncated
    # Same ids as the dataset path gives the text conversation: generated ids, then "\n".
    expected = prepare_prompt(llama_tokenizer, out.messages, max_length=256)
    assert torch.equal(out.prompt.input_ids, expected.input_ids)
    assert torch.equal(out.prompt.loss_mask, expected.loss_mask)


def test_generate_refuses_bad_arguments(engine) -> None:
    assert engine.can_generate
    with pytest.raises(EngineError, match="max_new_tokens must be positive"):
        engine.generate([1, 2], settings=GREEDY, max_new_tokens=0, seed=0)
    with pytest.raises(EngineError, match=r"regenerate\.mode 'beam' is unknown"):
        engine.generate([1, 2], settings=run_pb2.RegenerateConfig(mode="beam"),
                        max_new_tokens=1, seed=0)


# ------------------------------------------------------------------ the work loop


def _generated(samples: list) -> dict[str, list[list[int]]]:
    return {ref.sample_id: [list(t.token_ids) for t in ref.generated] for ref, _ in samples}


def test_a_regenerated_run_captures_and_commits_the_generated_tokens(
        stub, store, engine, llama_dir: Path, llama_tokenizer) -> None:
    rows = lines(6)
    run = create_run(stub, llama_dir, rows, regenerate={"max_new_tokens": 8})
    assert run.config.regenerate.mode == "greedy"
    producer = make_producer(stub, store, engine, llama_dir, run, lease_batch=4)
    stats = producer.run()
    assert stats.samples_committed == 6 and stats.prompts_failed == 0
    assert stats.turns_generated >= 6 and stats.tokens_generated > 0
    assert 0 < stats.generate_busy_s <= stats.engine_busy_s
    samples = read_all_steps(stub, run, store)
    assert len(samples) == 6
    for ref, tensors in samples:
        assert ref.generated, "the generated ids travel with the sample"
        again = _regenerate(engine, llama_tokenizer, _row_of(rows, ref.prompt_id),
                            run.config.regenerate, seed=sample_seed(
                                run.config.regenerate, ref.prompt_id, ref.epoch),
                            max_length=run.config.capture.max_length)
        assert list(ref.generated) == list(again.turns)
        assert torch.equal(tensors["input_ids"], again.prompt.input_ids)
        assert torch.equal(tensors["loss_mask"], again.prompt.loss_mask)


def _row_of(rows: list[str], pid: str) -> str:
    from services.dataset import parse_line, prompt_id

    return next(r for r in rows if prompt_id(parse_line(r)) == pid)


def _run_samples(stub, engine, llama_dir: Path, run_id: str, **kw: Any) -> dict:
    store = MemoryStore(f"regen-{run_id}", store_id="mem")
    run = create_run(stub, llama_dir, lines(3), run_id=run_id, **kw)
    make_producer(stub, store, engine, llama_dir, run).run()
    return _generated(read_all_steps(stub, run, store))


def test_seeded_sampling_is_the_same_from_another_producer(stub, engine,
                                                           llama_dir: Path) -> None:
    settings = {"mode": "sample", "top_k": 50, "max_new_tokens": 6, "seed": 7}
    first = _run_samples(stub, engine, llama_dir, "s1", regenerate=settings)
    second = _run_samples(stub, engine, llama_dir, "s2", regenerate=settings)
    other = _run_samples(stub, engine, llama_dir, "s3", regenerate={**settings, "seed": 8})
    assert first == second
    assert first != other


@pytest.mark.parametrize("per_epoch", [True, False])
def test_per_epoch_gives_each_epoch_its_own_responses(stub, engine, llama_dir: Path,
                                                      per_epoch: bool) -> None:
    settings = {"mode": "sample", "max_new_tokens": 6, "seed": 1, "per_epoch": per_epoch}
    got = _run_samples(stub, engine, llama_dir, f"pe{int(per_epoch)}", epochs=2,
                       regenerate=settings)
    pairs = [(got[sid], got[sid.replace(":e0", ":e1")]) for sid in got if sid.endswith(":e0")]
    assert len(pairs) == 3
    assert all((a != b) == per_epoch for a, b in pairs)


def test_truncated_turns_drop_their_sample_when_configured(stub, store, engine,
                                                           llama_dir: Path) -> None:
    # The random tiny target never emits its stop token, so every turn hits max_new_tokens.
    run = create_run(stub, llama_dir, lines(3), max_attempts=1,
                     regenerate={"max_new_tokens": 2, "on_truncation": "drop"})
    stats = make_producer(stub, store, engine, llama_dir, run).run()
    assert stats.samples_committed == 0 and stats.samples_dropped_truncated == 3
    assert stats.turns_truncated == 3
    st = status(stub)
    assert st.prompts["DEAD"] == 3


def test_a_lost_sample_is_recaptured_on_the_same_tokens(stub, store, engine, llama_dir: Path,
                                                        monkeypatch) -> None:
    from services.api import common_pb2
    from services.api import coordinator_pb2 as cpb

    settings = {"mode": "sample", "max_new_tokens": 6, "seed": 4}
    run = create_run(stub, llama_dir, lines(2), regenerate=settings)
    make_producer(stub, store, engine, llama_dir, run).run()
    tid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id=run.run_id, role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=run.fingerprint,
        identity="lost-finder", trainer_group="test")).session_id
    first = {ref.sample_id: ref for ref, _ in _peek(stub, run, store, tid)}
    lost = sorted(first)[0]
    assert stub.ReportLost(cpb.ReportLostRequest(
        session_id=tid, sample_id=lost, generation=0, reason="test")).recapture
    stub.UnregisterWorker(cpb.UnregisterWorkerRequest(session_id=tid))
    # Another producer instance recaptures it under the next generation, from the committed
    # tokens: it does not generate again.
    def refuse(*args: Any, **kw: Any) -> list[int]:
        raise AssertionError("a recapture generated again")

    monkeypatch.setattr(engine, "generate", refuse)
    again = make_producer(stub, store, engine, llama_dir, run).run()
    assert again.samples_committed == 1 and again.turns_generated == 0
    samples = {ref.sample_id: (ref, t) for ref, t in read_all_steps(stub, run, store)}
    ref, tensors = samples[lost]
    assert ref.generation == 1
    assert list(ref.generated) == list(first[lost].generated)
    assert torch.equal(tensors["input_ids"], store.get_sample(first[lost].tensors)["input_ids"])


def _peek(stub, run, store, session_id: str) -> list:
    """The refs of step 1 as a trainer sees them, without committing the step."""
    from services.api import coordinator_pb2 as cpb

    stream = stub.StreamSteps(cpb.StreamStepsRequest(session_id=session_id, rank=0,
                                                     from_step=1, prefetch=1))
    msg = next(stream)
    stream.cancel()
    return [(ref, store.get_sample(ref.tensors)) for ref in msg.refs]


def test_a_producer_whose_engine_cannot_generate_is_refused(stub, store, llama_dir: Path) -> None:
    from types import SimpleNamespace

    from producer.engines.sglang import SGLangEngine

    assert SGLangEngine._generate is CaptureEngine._generate  # SGLang generation: not yet
    run = create_run(stub, llama_dir, lines(2), regenerate={})
    sglang = SimpleNamespace(name="sglang", can_generate=False)
    with pytest.raises(EngineError, match="the sglang engine cannot do; run the producer with "
                                          "--engine hf"):
        make_producer(stub, store, sglang, llama_dir, run)  # type: ignore[arg-type]
