"""Regenerate a conversation's assistant turns with the target, as token ids ready to capture.

System and user turns are kept; every assistant turn is generated in order by the target,
conditioned on the history as regenerated so far, rendered with the run's chat template. The
sequence is built from token ids, never re-tokenized from text, so the capture that follows sees
exactly the tokens the target generated:

* the text the template writes before turn ``k`` (the user turn, the assistant header) is the new
  part of ``render(history, add_generation_prompt=True)``, tokenized on its own;
* the generated ids follow verbatim; when generation stopped on a stop token and the template
  closes the turn with that same token, the template's closing text continues after it (e.g. the
  newline after ``<|end|>``); otherwise the template's closing tokens follow the content.

The loss mask covers each turn's generated ids and its closing tokens, as ``producer.dataprep``
masks a dataset's answers. The decoded text of each turn goes into the history the next turns are
conditioned on. Generation is seeded per (run seed, prompt, epoch when ``per_epoch``, turn), so a
restarted producer or a recapture generates the same tokens; turns already generated for a
sample (committed with it) can be passed in instead and are reused as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.dataprep import LOSS_MASK_DTYPE, Messages, PreparedPrompt, PromptError, _render
from services.api import common_pb2, run_pb2

Generate = Callable[[list[int], int, int], list[int]]
"""``generate(input_ids, max_new_tokens, seed)`` -> the new token ids (stop token included)."""


@dataclass(frozen=True)
class Regenerated:
    """A conversation with its assistant turns regenerated, tokenized and masked."""

    prompt: PreparedPrompt
    """The token ids to capture and their loss mask (the regenerated assistant spans)."""
    turns: tuple[common_pb2.GeneratedTurn, ...]
    """The ids generated (or reused) for each assistant turn, in order."""
    messages: Messages
    """The conversation as text with the regenerated answers, up to the last turn that fit."""
    reused: bool
    """True when every turn was given, none generated."""

    @property
    def truncated_turns(self) -> int:
        return sum(t.truncated for t in self.turns)

    @property
    def tokens_generated(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)


def sample_seed(settings: run_pb2.RegenerateConfig, prompt_id: str, epoch: int) -> int:
    """The seed of one sample: fixed by the run's seed, the prompt and (``per_epoch``) the epoch."""
    material = f"{settings.seed}\x00{prompt_id}\x00{epoch if settings.per_epoch else 0}"
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big") >> 1


def _turn_seed(seed: int, turn: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{turn}".encode()).digest()[:8], "big") >> 1


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The template writes BOS and the like itself; the tokenizer must not add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def regenerate(generate: Generate, tokenizer: Any, messages: Messages, *,
               settings: run_pb2.RegenerateConfig, max_length: int, seed: int,
               stop_token_ids: Sequence[int], chat_template: str | None = None,
               given: Sequence[common_pb2.GeneratedTurn] = ()) -> Regenerated:
    """Regenerate every assistant turn of ``messages``; see the module docstring.

    Turns stop when the sequence reaches ``max_length``: a turn cut by it counts as truncated,
    and later turns are left out. ``given`` turns are reused instead of generating (a recapture).
    Raises ``PromptError`` (not retryable) when the conversation cannot be regenerated.
    """
    if not messages:
        raise PromptError("conversation has no turns")
    if tokenizer.chat_template is None and not chat_template:
        raise PromptError("the tokenizer has no chat template; set capture.chat_template")
    stops = set(int(t) for t in stop_token_ids)
    history: Messages = []
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    turns: list[common_pb2.GeneratedTurn] = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            history.append(dict(message))
            continue
        before = _render(tokenizer, history, chat_template, add_generation_prompt=True)
        if not before.startswith(rendered):
            raise PromptError(f"the chat template does not render turn {k} incrementally, so "
                              "the regenerated history cannot be extended token by token")
        head = _encode(tokenizer, before[len(rendered):])
        ids += head
        mask += [0] * len(head)
        room = max_length - len(ids)
        if room <= 0:
            break  # no room left to answer: the conversation ends before this turn
        n = len(turns)
        if n < len(given):
            turn = common_pb2.GeneratedTurn()
            turn.CopyFrom(given[n])
        else:
            budget = min(settings.max_new_tokens, room)
            new = [int(t) for t in generate(ids, budget, _turn_seed(seed, n))]
            stopped = bool(new) and new[-1] in stops
            turn = common_pb2.GeneratedTurn(token_ids=new, truncated=not stopped)
        turns.append(turn)
        new = list(turn.token_ids)
        stopped = bool(new) and new[-1] in stops
        content = new[:-1] if stopped else new
        text = tokenizer.decode(content, skip_special_tokens=False)
        through = _render(tokenizer, [*history, {"role": "assistant", "content": text}],
                          chat_template, add_generation_prompt=False)
        if not through.startswith(before + text):
            raise PromptError(f"the chat template rewrites the text of assistant turn {k}, so "
                              "the generated tokens cannot be captured as generated")
        closing = _encode(tokenizer, through[len(before) + len(text):])
        # When the template closes the turn with the stop token generated, keep that token.
        answer = new + closing[1:] if stopped and closing[:1] == new[-1:] else content + closing
        ids += answer
        mask += [1] * len(answer)
        history.append({"role": "assistant", "content": text})
        rendered = through
    if not turns:
        raise PromptError(f"no room to regenerate an answer within max_length={max_length}; "
                          "raise capture.max_length or shorten the conversation")
    if not any(mask):
        raise PromptError("the regenerated conversation has no assistant token to train on")
    cut = len(ids) > max_length or len(turns) < sum(m["role"] == "assistant" for m in messages)
    prompt = PreparedPrompt(input_ids=torch.tensor(ids[:max_length], dtype=torch.int64),
                            loss_mask=torch.tensor(mask[:max_length], dtype=LOSS_MASK_DTYPE),
                            truncated=cut)
    return Regenerated(prompt=prompt, turns=tuple(turns), messages=history,
                       reused=len(given) >= len(turns))
