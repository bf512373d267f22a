"""The hf capture engine against plain transformers, batching, layer choice and guards."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from producer.dataprep import prepare_prompt
from producer.engines import ENGINES, EngineConfig, EngineError, create_engine
from producer.engines.hf import HFEngine, plan_batches
from producer.features import sample_features


def _random_seqs(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 70))] for _ in range(n)]


def _reference(model_dir: Path, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """hidden_states of a plain transformers forward pass over one unpadded sequence."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


@pytest.fixture(scope="module")
def llama_engine(llama_dir: Path) -> HFEngine:
    engine = create_engine("hf", EngineConfig(model_path=str(llama_dir), device="cpu"))
    assert isinstance(engine, HFEngine)
    return engine


def test_defaults_on_cpu(llama_engine: HFEngine) -> None:
    assert llama_engine.name == "hf"
    assert llama_engine.device == torch.device("cpu")
    assert llama_engine.dtype == torch.float32
    assert (llama_engine.num_layers, llama_engine.hidden_size) == (8, 128)
    assert llama_engine.aux_layer_ids == [1, 3, 4]  # [1, N//2-1, N-4]


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen3_dir"])
def test_capture_matches_plain_transformers(request: pytest.FixtureRequest, fixture: str) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    ids = _random_seqs(1, 2048, seed=1)[0] + [5] * 10
    with create_engine("hf", EngineConfig(model_path=str(model_dir), device="cpu")) as engine:
        got = engine.capture([ids])[0]
        aux_ids = engine.aux_layer_ids
    hidden_states = _reference(model_dir, ids)
    # hidden_states[i + 1] is the output of decoder layer i; one forward pass, so bit-identical.
    assert torch.equal(got.aux_hidden_state,
                       torch.cat([hidden_states[i + 1] for i in aux_ids], dim=-1))
    assert torch.equal(got.hidden_state, hidden_states[-1])
    assert got.num_tokens == len(ids)


def test_hidden_state_is_post_norm(llama_dir: Path, llama_engine: HFEngine) -> None:
    ids = _random_seqs(1, 2048, seed=2)[0]
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    last_layer: list[torch.Tensor] = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last_layer.append(out[0] if isinstance(out, tuple) else out))
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    handle.remove()
    got = llama_engine.capture([ids])[0].hidden_state
    with torch.inference_mode():
        assert torch.equal(got, model.model.norm(last_layer[0])[0])
        assert not torch.allclose(got, last_layer[0][0])
        # What the trainer does with it: the frozen lm_head gives the target's logits.
        assert torch.allclose(model.lm_head(got), logits, atol=1e-5)


def test_batched_capture_equals_one_by_one(llama_engine: HFEngine) -> None:
    seqs = _random_seqs(12, 2048, seed=3)
    one_by_one = [llama_engine.capture([s])[0] for s in seqs]
    batched = llama_engine.capture(seqs)
    assert [b.num_tokens for b in batched] == [len(s) for s in seqs]
    for single, many in zip(one_by_one, batched, strict=True):
        # Padded rows run through differently shaped matmuls, so float32 sums may differ in the
        # last bits; a wrong mask or a lost pad would differ by orders of magnitude more.
        torch.testing.assert_close(many.aux_hidden_state, single.aux_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(many.hidden_state, single.hidden_state, atol=1e-5, rtol=1e-5)


def test_small_token_budget_gives_the_same_results(llama_dir: Path,
                                                   llama_engine: HFEngine) -> None:
    seqs = _random_seqs(6, 2048, seed=4)
    wide = llama_engine.capture(seqs)
    cfg = EngineConfig(model_path=str(llama_dir), device="cpu", token_budget=16)
    with create_engine("hf", cfg) as narrow:
        small = narrow.capture(seqs)
    for a, b in zip(wide, small, strict=True):
        torch.testing.assert_close(a.hidden_state, b.hidden_state, atol=1e-5, rtol=1e-5)


def test_plan_batches_respects_the_budget() -> None:
    lengths = [5, 40, 12, 12, 300, 1, 39, 7]
    groups = plan_batches(lengths, token_budget=100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [4] in groups  # longer than the budget: alone
    for g in groups:
        if len(g) > 1:
            assert len(g) * max(lengths[i] for i in g) <= 100
    assert groups == [[4], [1, 6], [2, 3, 7, 0, 5]]


def test_custom_aux_layers(llama_dir: Path) -> None:
    ids = _random_seqs(1, 2048, seed=5)[0]
    cfg = EngineConfig(model_path=str(llama_dir), device="cpu", aux_layer_ids=(0, 2, 6))
    with create_engine("hf", cfg) as engine:
        got = engine.capture([ids])[0]
    hidden_states = _reference(llama_dir, ids)
    assert torch.equal(got.aux_hidden_state,
                       torch.cat([hidden_states[1], hidden_states[3], hidden_states[7]], dim=-1))


@pytest.mark.parametrize(("aux", "message"), [
    ((1, 3, 3), r"repeats a layer"),
    ((1, 3), r"must list 3 layer ids, got \[1, 3\]"),
    ((6, 0, 2), r"must be ascending \(\[0, 2, 6\]\): SGLang captures layers in ascending"),
    ((1, 3, 7), r"\[7\] out of range: the target has 8 layers, so ids must be in \[0, 6\]"),
    ((-1, 3, 4), r"\[-1\] out of range"),
])
def test_bad_aux_layers_are_refused(llama_dir: Path, aux: tuple[int, ...], message: str) -> None:
    with pytest.raises(EngineError, match=message):
        create_engine("hf", EngineConfig(model_path=str(llama_dir), aux_layer_ids=aux))


def test_guards(llama_dir: Path, llama_engine: HFEngine) -> None:
    assert llama_engine.capture([]) == []
    with pytest.raises(EngineError, match=r"batch\[1\] is empty"):
        llama_engine.capture([[1, 2], []])
    with pytest.raises(EngineError, match=r"batch\[0\] has token ids \[2048\] outside the target"):
        llama_engine.capture([[1, 2048]])
    with pytest.raises(EngineError, match="capture engine 'vllm'; choose one of hf, sglang"):
        create_engine("vllm", EngineConfig(model_path=str(llama_dir)))
    with pytest.raises(EngineError, match=r"has no config\.json"):
        create_engine("hf", EngineConfig(model_path=str(llama_dir / "nope")))
    with pytest.raises(EngineError, match="dtype 'int8' is not supported"):
        create_engine("hf", EngineConfig(model_path=str(llama_dir), dtype="int8"))
    engine = create_engine("hf", EngineConfig(model_path=str(llama_dir), device="cpu"))
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="hf engine is closed"):
        engine.capture([[1]])
    assert sorted(ENGINES) == ["hf", "sglang"]
    with pytest.raises(EngineError, match="writes features to the store itself"):
        create_engine("sglang", EngineConfig(model_path=str(llama_dir)))


def test_eagle3_features(llama_tokenizer, llama_engine: HFEngine) -> None:
    conv = [{"role": "user", "content": "Convert 3 km to miles."},
            {"role": "assistant", "content": "About 1.86 miles."}]
    prompt = prepare_prompt(llama_tokenizer, conv, max_length=64)
    captured = llama_engine.capture([prompt.input_ids.tolist()])[0]
    feats = sample_features(prompt, captured, llama_engine.plan)
    n, h = prompt.num_tokens, llama_engine.hidden_size
    assert tuple(feats) == ("input_ids", "loss_mask", "aux_hidden_state", "hidden_state")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in feats.items()} == {
        "input_ids": (torch.int64, (n,)),
        "loss_mask": (torch.uint8, (n,)),
        "aux_hidden_state": (torch.float32, (n, 3 * h)),
        "hidden_state": (torch.float32, (n, h)),
    }
    assert all(v.is_contiguous() for v in feats.values())
    other = llama_engine.capture([prompt.input_ids.tolist()[:-1]])[0]
    with pytest.raises(EngineError, match=f"captured {n - 1} positions for a prompt of {n}"):
        sample_features(prompt, other, llama_engine.plan)


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_dflash_capture_follows_the_plan(qwen3_dir: Path, llama_tokenizer,
                                         algorithm: str) -> None:
    """The DFlash family captures its target layers ("output of layer id") and no final state."""
    ids = _random_seqs(1, 2048, seed=4)[0] + [7] * 5
    config = EngineConfig(model_path=str(qwen3_dir), device="cpu", aux_layer_ids=(0, 2, 5),
                          algorithm=algorithm)
    prompt = prepare_prompt(llama_tokenizer, [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello."}], 64)
    with create_engine("hf", config) as engine:
        got = engine.capture([ids])[0]
        plan = engine.plan
        features = sample_features(prompt, engine.capture([prompt.input_ids.tolist()])[0], plan)
    assert (plan.layer_ids, plan.layers_tensor, plan.final_hidden) == (
        (0, 2, 5), "hidden_states", False)
    hidden_states = _reference(qwen3_dir, ids)
    assert torch.equal(got.aux_hidden_state,
                       torch.cat([hidden_states[i + 1] for i in (0, 2, 5)], dim=-1))
    assert got.hidden_state is None
    assert tuple(features) == ("input_ids", "loss_mask", "hidden_states")


@pytest.mark.parametrize(("ids", "message"), [
    ((2, 1, 5), "must be ascending"),
    ((1, 1), "repeats a layer"),
    ((1, 7), "out of range"),
    ((), "is empty"),
])
def test_dflash_layer_ids_are_validated(qwen3_dir: Path, ids: tuple[int, ...],
                                        message: str) -> None:
    with pytest.raises(EngineError, match=message):
        create_engine("hf", EngineConfig(model_path=str(qwen3_dir), device="cpu",
                                          aux_layer_ids=ids, algorithm="dflash"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_capture_matches_transformers_on_gpu(llama_dir: Path) -> None:
    ids = _random_seqs(1, 2048, seed=7)[0]
    with create_engine("hf", EngineConfig(model_path=str(llama_dir))) as gpu:
        got = gpu.capture([ids])[0]
        aux_ids = gpu.aux_layer_ids
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        out = model(torch.tensor([ids], device="cuda"),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
                    output_hidden_states=True)
    hs = [h[0].cpu() for h in out.hidden_states]
    # Same device, dtype and inputs; GPU kernels may still reorder sums, so compare in bf16 ulps.
    torch.testing.assert_close(got.aux_hidden_state, torch.cat([hs[i + 1] for i in aux_ids], -1),
                               atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.hidden_state, hs[-1], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_capture_is_bf16_and_close_to_cpu(llama_dir: Path, llama_engine: HFEngine) -> None:
    seqs = _random_seqs(8, 2048, seed=6)
    with create_engine("hf", EngineConfig(model_path=str(llama_dir))) as gpu:
        assert gpu.device.type == "cuda"
        assert gpu.dtype == torch.bfloat16
        got = gpu.capture(seqs)
    ref = llama_engine.capture(seqs)
    for g, r in zip(got, ref, strict=True):
        assert g.hidden_state.device.type == "cpu"
        assert g.hidden_state.dtype == torch.bfloat16
        # bf16 keeps ~3 significant digits; compare against the float32 CPU capture loosely.
        torch.testing.assert_close(g.hidden_state.float(), r.hidden_state, atol=0.1, rtol=0.05)
        torch.testing.assert_close(g.aux_hidden_state.float(), r.aux_hidden_state,
                                   atol=0.1, rtol=0.05)
