"""Tiny target models, built locally, for tests, benchmarks and ``draftflow up``.

A tiny target is a normal Hugging Face model directory (``config.json``, ``model.safetensors``,
tokenizer files with a chat template), so the real ``from_pretrained`` loading code runs on it.
The tokenizer is a byte-level BPE trained on the dataset's text, so no hub download is needed.
Everything is seeded: the same arguments give the same weights and the same tokenizer.

Random-initialised weights (the default, fast) predict a nearly flat next-token distribution, so a
draft has little to learn from them. ``pretrain_steps`` first trains the model briefly on the
dataset's conversations, giving it the sharp, structured predictions a real target has; the
example target of ``draftflow up`` is built that way (``build_example_target``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from services.dataset import BadRow, parse_line

Arch = Literal["llama", "qwen3"]
# The example conversations, through the package's copy of examples/ so an installed draftflow
# has them too (in a checkout, draftflow/examples is a link to examples/).
DEFAULT_DATASET = (Path(__file__).resolve().parent.parent / "draftflow" / "examples" / "data"
                   / "conversations.jsonl")
MARKER = "draftflow_tiny.json"

BOS, END, PAD = "<s>", "<|end|>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\n{content}<|end|>\n". The assistant part sits in a generation block so
# `return_assistant_tokens_mask` works too; the producer derives masks without relying on it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class TinyModelError(RuntimeError):
    """The output directory cannot hold the requested tiny model; the message says what to do."""


def _dataset_texts(dataset: Path) -> Iterator[str]:
    with dataset.open() as f:
        for line in f:
            if not line.strip():
                continue
            try:
                conv = parse_line(line)
            except BadRow:
                continue
            for message in conv.messages:
                yield message.content


def build_tokenizer(dataset: Path, vocab_size: int):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE on the dataset's text and wrap it with special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, END, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_dataset_texts(dataset), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _model_config(arch: Arch, num_layers: int, hidden_size: int, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, Qwen3Config

    heads = max(1, hidden_size // 64)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=(hidden_size * 8 // 3 + 31) // 32 * 32,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=hidden_size // heads, **common)
    raise TinyModelError(f"unknown arch {arch!r}; use 'llama' or 'qwen3'")


def build_tiny_target(
    out_dir: str | Path,
    arch: Arch = "llama",
    num_layers: int = 8,
    hidden_size: int = 128,
    vocab_size: int = 2048,
    seed: int = 0,
    dataset: str | Path | None = None,
    pretrain_steps: int = 0,
) -> Path:
    """Build (or reuse) a tiny target model directory and return its path.

    Idempotent: a complete directory built with the same arguments is reused as is; one built with
    other arguments is refused rather than overwritten. The directory is written beside ``out_dir``
    first and renamed into place, so a crash never leaves a half-written model behind.
    """
    out = Path(out_dir)
    dataset_path = Path(dataset) if dataset is not None else DEFAULT_DATASET
    if num_layers < 4:
        raise TinyModelError(f"num_layers={num_layers}: EAGLE3 capture needs at least 4 layers")
    if hidden_size % 64 and hidden_size >= 64:
        raise TinyModelError(f"hidden_size={hidden_size} must be a multiple of 64")
    if pretrain_steps < 0:
        raise TinyModelError(f"pretrain_steps={pretrain_steps} must be >= 0")
    params = {
        "arch": arch, "num_layers": num_layers, "hidden_size": hidden_size,
        "vocab_size": vocab_size, "seed": seed, "dataset": dataset_path.name,
    }
    if pretrain_steps:
        params["pretrain_steps"] = pretrain_steps
    if (existing := _read_marker(out)) is not None:
        if existing != params:
            raise TinyModelError(
                f"{out} holds a tiny model built with {existing}, not {params}; "
                "delete the directory or choose another one"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise TinyModelError(f"{out} exists and is not a tiny model directory; choose another path")

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(tmp, arch, num_layers, hidden_size, vocab_size, seed, dataset_path,
                     pretrain_steps)
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first: use its copy if it is the same model.
            if _read_marker(out) != params:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


EXAMPLE_PRETRAIN_STEPS = 200
"""Pre-training steps of the example target: ~20 s on 2 CPU cores, enough for sharp predictions."""


def build_example_target(out_dir: str | Path) -> Path:
    """The target of ``examples/tiny.yaml``: the default tiny model, pre-trained on the example
    conversations so that drafting it is a real task."""
    return build_tiny_target(out_dir, pretrain_steps=EXAMPLE_PRETRAIN_STEPS)


def build_example_qwen3_target(out_dir: str | Path) -> Path:
    """The target of ``examples/tiny-dflash.yaml`` and ``tiny-domino.yaml``: a tiny Qwen3
    (the architecture SGLang serves DFlash drafts for), pre-trained like the default one."""
    return build_tiny_target(out_dir, arch="qwen3", pretrain_steps=EXAMPLE_PRETRAIN_STEPS)


EXAMPLE_TARGETS = {"tiny-target": build_example_target,
                   "tiny-qwen3-target": build_example_qwen3_target}
"""Directory name a bundled example's ``target.model_path`` ends in -> how to build it."""


def _pretrain(model, tokenizer, dataset: Path, steps: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Next-token training on the dataset's chat-formatted conversations (seeded, CPU)."""
    import torch

    stream: list[int] = []
    with dataset.open() as f:
        for line in f:
            try:
                conv = parse_line(line)
            except BadRow:
                continue
            messages = [{"role": m.role, "content": m.content} for m in conv.messages]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
    tokens = torch.tensor(stream, dtype=torch.long)
    window, batch = 128, 8
    if len(tokens) <= window:
        raise TinyModelError(
            f"{dataset} has too little text to pre-train on ({len(tokens)} tokens)")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - window, (batch,), generator=gen)
        ids = torch.stack([tokens[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()


def _write_model(path: Path, arch: Arch, num_layers: int, hidden_size: int, vocab_size: int,
                 seed: int, dataset: Path, pretrain_steps: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(dataset, vocab_size)
    if len(tokenizer) > vocab_size:
        raise TinyModelError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    config = _model_config(arch, num_layers, hidden_size, vocab_size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if pretrain_steps:
        _pretrain(model, tokenizer, dataset, pretrain_steps, seed)
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
