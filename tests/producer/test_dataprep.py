"""Chat template, assistant-only loss mask, truncation and bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from producer.dataprep import (
    LOSS_MASK_DTYPE,
    PromptError,
    parse_row,
    prepare_dataset,
    prepare_prompt,
    render_with_spans,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, naïvely ✓"},
]
# Written out by hand from the template "<|role|>\n{content}<|end|>\n" after "<s>".
EXPECTED_TEXT = (
    "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n"
    "<|assistant|>\nIt is 4.<|end|>\n<|user|>\nAnd 3+3?<|end|>\n"
    "<|assistant|>\n6, naïvely ✓<|end|>\n"
)
EXPECTED_TRAINED = ["It is 4.<|end|>\n", "6, naïvely ✓<|end|>\n"]


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s."""
    runs, start = [], None
    for i, v in enumerate([*values, 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_mask_covers_exactly_the_assistant_turns(llama_tokenizer) -> None:
    tok = llama_tokenizer
    p = prepare_prompt(tok, CONVERSATION, max_length=512)
    assert p.input_ids.dtype == torch.int64
    assert p.loss_mask.dtype == LOSS_MASK_DTYPE == torch.uint8
    assert not p.truncated
    ids, mask = p.input_ids.tolist(), p.loss_mask.tolist()
    assert tok.decode(ids) == EXPECTED_TEXT
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    runs = _runs(mask)
    assert [tok.decode(ids[a:b]) for a, b in runs] == EXPECTED_TRAINED
    # Each trained run starts right after "<|assistant|>" "\n" and ends with "<|end|>" "\n".
    for a, b in runs:
        assert tok.convert_ids_to_tokens(ids[a - 2 : a]) == ["<|assistant|>", "Ċ"]
        assert tok.convert_ids_to_tokens(ids[b - 2 : b]) == ["<|end|>", "Ċ"]
    untrained = "".join(tok.decode([t]) for t, m in zip(ids, mask, strict=True) if not m)
    assert untrained == EXPECTED_TEXT.replace(EXPECTED_TRAINED[0], "").replace(
        EXPECTED_TRAINED[1], "")
    assert p.num_trainable == sum(len(tok(t, add_special_tokens=False)["input_ids"])
                                  for t in EXPECTED_TRAINED)


def test_mask_agrees_with_generation_blocks(llama_tokenizer) -> None:
    """The tiny template marks assistant text with {% generation %}; both derivations agree."""
    p = prepare_prompt(llama_tokenizer, CONVERSATION, max_length=512)
    ref = llama_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert ref["input_ids"] == p.input_ids.tolist()
    assert ref["assistant_masks"] == p.loss_mask.tolist()


def test_truncation_keeps_the_head(llama_tokenizer) -> None:
    full = prepare_prompt(llama_tokenizer, CONVERSATION, max_length=512)
    first_trained = full.loss_mask.tolist().index(1)
    cut = prepare_prompt(llama_tokenizer, CONVERSATION, max_length=first_trained + 3)
    assert cut.truncated
    assert cut.input_ids.tolist() == full.input_ids.tolist()[: first_trained + 3]
    assert cut.loss_mask.tolist() == full.loss_mask.tolist()[: first_trained + 3]
    assert cut.num_trainable == 3


def test_no_assistant_token_within_max_length_is_not_retryable(llama_tokenizer) -> None:
    full = prepare_prompt(llama_tokenizer, CONVERSATION, max_length=512)
    first_trained = full.loss_mask.tolist().index(1)
    with pytest.raises(PromptError) as info:
        prepare_prompt(llama_tokenizer, CONVERSATION, max_length=first_trained)
    assert not info.value.retryable
    assert info.value.reason == (
        f"no assistant token within max_length={first_trained} (the first one is at position "
        f"{first_trained} of {full.num_tokens}); raise capture.max_length or shorten the "
        "conversation"
    )


def test_template_that_is_not_incremental_is_refused(llama_tokenizer) -> None:
    # Puts the number of turns up front, so a shorter conversation is not a prefix of a longer one.
    template = ("{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(PromptError, match="does not render turn 2 incrementally"):
        prepare_prompt(llama_tokenizer, CONVERSATION, max_length=512, chat_template=template)


def test_config_template_overrides_the_tokenizer_one(llama_tokenizer) -> None:
    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    text, spans = render_with_spans(llama_tokenizer, CONVERSATION[1:3], template)
    assert text == "[user]What is 2+2?\n[assistant]It is 4.\n"
    assert [text[a:b] for a, b in spans] == ["It is 4.\n"]


def test_messages_form_and_sharegpt_form_agree(llama_tokenizer) -> None:
    sharegpt = json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                             {"from": "gpt", "value": "Hello!"}]})
    messages = json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello!"}]})
    assert parse_row(sharegpt) == parse_row(messages) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_bad_rows_get_line_numbers_and_reasons(llama_tokenizer) -> None:
    good = json.dumps({"conversations": [{"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello!"}]})
    lines = [
        good,
        "{not json",
        "",
        json.dumps([1, 2]),
        json.dumps({"text": "hello"}),
        json.dumps({"conversations": []}),
        json.dumps({"conversations": [{"from": "human", "value": "only a question"}]}),
        json.dumps({"conversations": [{"from": "robot", "value": "beep"}]}),
        json.dumps({"conversations": [{"from": "human", "value": 3},
                                      {"from": "gpt", "value": "x"}]}),
        good,
    ]
    prompts, bad = prepare_dataset(llama_tokenizer, lines, max_length=512)
    assert [line for line, _ in prompts] == [1, 10]
    assert bad == [
        (2, "not valid JSON: Expecting property name enclosed in double quotes at column 2"),
        (4, "expected a JSON object with 'conversations' or 'messages'"),
        (5, "no 'conversations' or 'messages' field"),
        (6, "'conversations' must be a non-empty list of turns"),
        (7, "no assistant turn: nothing to train on"),
        (8, "turn 0 has unknown role 'robot'"),
        (9, "turn 0 has no text content"),
    ]


def test_every_example_row_prepares(llama_tokenizer) -> None:
    from services.dataset import parse_line, prompt_id
    from services.tiny_model import DEFAULT_DATASET

    lines = DEFAULT_DATASET.read_text().splitlines()
    prompts, bad = prepare_dataset(llama_tokenizer, lines, max_length=2048)
    assert bad == []
    assert len(prompts) == len(lines) >= 300
    assert all(0 < p.num_trainable < p.num_tokens for _, p in prompts)
    # No two rows collapse into one prompt at run creation.
    assert len({prompt_id(parse_line(line)) for line in lines}) == len(lines)
