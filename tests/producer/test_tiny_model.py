"""Tiny targets are normal HF model directories, reproducible, and never silently overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.tiny_model import MARKER, TinyModelError, build_tiny_target
from services.tokenizer import tokenizer_hash


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("fixture", "cls"), [("llama_dir", "LlamaForCausalLM"),
                                              ("qwen3_dir", "Qwen3ForCausalLM")])
def test_loads_through_from_pretrained(request: pytest.FixtureRequest, fixture: str,
                                       cls: str) -> None:
    path: Path = request.getfixturevalue(fixture)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == cls
    assert model.config.num_hidden_layers == 8
    assert model.config.hidden_size == 128
    assert model.config.vocab_size == 2048
    assert len(tok) <= model.config.vocab_size
    assert tok.is_fast
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0].tolist())[:2] == ["<s>", "<|user|>"]
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()


def test_same_arguments_give_identical_files(llama_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_target(tmp_path / "again", arch="llama")
    assert _sha(again / "model.safetensors") == _sha(llama_dir / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(llama_dir / "tokenizer.json")
    assert tokenizer_hash(AutoTokenizer.from_pretrained(again)) == tokenizer_hash(
        AutoTokenizer.from_pretrained(llama_dir))


def test_other_seed_gives_other_weights(llama_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_target(tmp_path / "seed1", arch="llama", seed=1)
    assert _sha(other / "model.safetensors") != _sha(llama_dir / "model.safetensors")


def test_rebuild_reuses_a_complete_directory(tmp_path: Path) -> None:
    out = build_tiny_target(tmp_path / "m", num_layers=4, hidden_size=64, vocab_size=512)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_target(out, num_layers=4, hidden_size=64, vocab_size=512) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert not list(tmp_path.glob("*.tmp-*"))


def test_rebuild_with_other_arguments_is_refused(tmp_path: Path) -> None:
    out = build_tiny_target(tmp_path / "m", num_layers=4, hidden_size=64, vocab_size=512)
    with pytest.raises(TinyModelError, match="delete the directory or choose another one"):
        build_tiny_target(out, num_layers=5, hidden_size=64, vocab_size=512)


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(TinyModelError, match="is not a tiny model directory"):
        build_tiny_target(tmp_path / "x")
    assert not (tmp_path / "x" / MARKER).exists()


def test_tokenizer_hash_sees_the_chat_template(llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama_dir)
    base = tokenizer_hash(tok)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(llama_dir)) == base
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_hash(tok) != base


def test_tokenizer_hash_sees_the_vocabulary(llama_dir: Path, tmp_path: Path) -> None:
    small = build_tiny_target(tmp_path / "small", num_layers=4, hidden_size=64, vocab_size=512)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(small)) != tokenizer_hash(
        AutoTokenizer.from_pretrained(llama_dir))


def _mean_top_probability(model_dir: Path) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Sort 3, 1, 2"},
                                    {"role": "assistant", "content": "1, 2, 3"}], tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        return float(model(ids).logits.softmax(-1).max(-1).values.mean())


def test_pretraining_gives_a_target_worth_drafting(tmp_path: Path) -> None:
    kw = {"num_layers": 4, "hidden_size": 64, "vocab_size": 512}
    flat = build_tiny_target(tmp_path / "flat", **kw)
    trained = build_tiny_target(tmp_path / "trained", pretrain_steps=40, **kw)
    # Random weights spread next-token probability almost evenly (uniform is 1/512 = 0.002);
    # a short pre-training on the example conversations makes the predictions sharp.
    assert _mean_top_probability(flat) < 0.01
    assert _mean_top_probability(trained) > 0.1
    assert _sha(trained / "tokenizer.json") == _sha(flat / "tokenizer.json")
    assert build_tiny_target(tmp_path / "again", pretrain_steps=40, **kw) is not None
    assert _sha(tmp_path / "again" / "model.safetensors") == _sha(trained / "model.safetensors")
    with pytest.raises(TinyModelError, match="delete the directory"):
        build_tiny_target(trained, **kw)  # built pre-trained; asked for the random one
    with pytest.raises(TinyModelError, match="pretrain_steps=-1"):
        build_tiny_target(tmp_path / "bad", pretrain_steps=-1, **kw)
