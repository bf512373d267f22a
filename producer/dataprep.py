"""Turn a conversation into model input: chat template, token ids and the assistant-only loss mask.

How the mask is derived: for every assistant turn k the chat template is rendered twice, once for
the turns before it with the generation prompt (``P_k``) and once including it (``Q_k``). The
characters ``Q_k[len(P_k):]`` are what the assistant "says" in that turn (its text plus whatever
end-of-turn marker the template emits). The whole conversation is tokenized once, exactly as at
inference, and a token is trainable when its first character falls in one of those spans. This
works with any template that renders turns incrementally (each render is a prefix of the whole
conversation), whether or not it has ``{% generation %}`` blocks; a template that is not
incremental is refused with a reason instead of producing a wrong mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.api import run_pb2
from services.dataset import BadRow, parse_line

Messages = list[dict[str, str]]
# The loss mask travels as uint8 (0/1): every byte value is a valid uint8, which is not true of
# torch.bool when a receiver reads raw bytes from the feature store.
LOSS_MASK_DTYPE = torch.uint8


class PromptError(ValueError):
    """A prompt that cannot become a training sample; ``reason`` says why.

    ``retryable`` is False when capturing it again can never succeed (the prompt itself is the
    problem), so the coordinator marks it DEAD instead of handing it out again.
    """

    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids of one templated conversation and its assistant-only loss mask."""

    input_ids: torch.Tensor
    """int64 [L], at most ``max_length`` tokens."""
    loss_mask: torch.Tensor
    """uint8 [L]: 1 where the token is part of an assistant turn."""
    truncated: bool
    """True when the templated conversation was longer than ``max_length``."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trainable(self) -> int:
        return int(self.loss_mask.sum())


def messages_from_conversation(conv: run_pb2.Conversation) -> Messages:
    """The ``[{"role", "content"}]`` list that chat templates expect."""
    return [{"role": m.role, "content": m.content} for m in conv.messages]


def parse_row(line: str) -> Messages:
    """Parse one dataset line into messages, or raise ``PromptError`` with the reason."""
    try:
        return messages_from_conversation(parse_line(line))
    except BadRow as exc:
        raise PromptError(str(exc)) from None


def _render(tokenizer: Any, messages: Messages, chat_template: str | None,
            add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=chat_template or None,
        )
    except Exception as exc:  # template errors are Jinja's, raised from user-supplied templates
        raise PromptError(f"chat template failed on this conversation: {exc}") from None


def render_with_spans(tokenizer: Any, messages: Messages,
                      chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The templated text and the character spans ``[start, end)`` of each assistant turn."""
    if not messages:
        raise PromptError("conversation has no turns")
    if tokenizer.chat_template is None and not chat_template:
        raise PromptError("the tokenizer has no chat template; set capture.chat_template",
                          retryable=False)
    text = _render(tokenizer, messages, chat_template, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], chat_template, add_generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1], chat_template, add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise PromptError(
                f"the chat template does not render turn {k} incrementally (the text of the "
                "first turns is not a prefix of the whole conversation), so the assistant "
                "tokens cannot be located; use a template whose earlier turns render the same "
                "in a longer conversation"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    if not spans:
        raise PromptError("the chat template renders no assistant text: nothing to train on")
    return text, spans


def prepare_prompt(tokenizer: Any, messages: Messages, max_length: int,
                   chat_template: str | None = None) -> PreparedPrompt:
    """Apply the chat template, tokenize, mask non-assistant tokens and truncate.

    Raises ``PromptError`` (not retryable) when no assistant token survives truncation.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    text, spans = render_with_spans(tokenizer, messages, chat_template)
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError("loss masks need a fast tokenizer (character offsets); "
                          "install the model's tokenizer.json")
    # The template already wrote BOS and the like; do not let the tokenizer add them again.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    starts = [s for s, _ in spans]
    mask = []
    for start, _end in enc["offset_mapping"]:
        j = bisect.bisect_right(starts, start) - 1
        mask.append(1 if j >= 0 and start < spans[j][1] else 0)
    if not any(mask):
        raise PromptError("no token falls inside an assistant turn: nothing to train on")
    first = mask.index(1)
    if first >= max_length:
        raise PromptError(
            f"no assistant token within max_length={max_length} (the first one is at position "
            f"{first} of {len(ids)}); raise capture.max_length or shorten the conversation"
        )
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return PreparedPrompt(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        loss_mask=torch.tensor(mask, dtype=LOSS_MASK_DTYPE),
        truncated=truncated,
    )


def prepare_dataset(tokenizer: Any, lines: Sequence[str], max_length: int,
                    chat_template: str | None = None,
                    ) -> tuple[list[tuple[int, PreparedPrompt]], list[tuple[int, str]]]:
    """Prepare every non-blank line; return ``(line, prompt)`` and ``(line, reason)`` pairs.

    Line numbers are 1-based, as an editor shows them. Blank lines are neither prompts nor bad rows.
    """
    good: list[tuple[int, PreparedPrompt]] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            good.append((number, prepare_prompt(tokenizer, parse_row(line), max_length,
                                                chat_template)))
        except PromptError as exc:
            bad.append((number, exc.reason))
    return good, bad
