"""Dataset rows: ShareGPT-style conversations, one JSON object per line.

Accepted forms: ``{"conversations": [{"from": "human", "value": "..."}, ...]}`` and
``{"messages": [{"role": "user", "content": "..."}, ...]}``. Roles are normalised to
``system``, ``user`` and ``assistant``.
"""

from __future__ import annotations

import hashlib
import json

from services.api import run_pb2

_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}


class BadRow(ValueError):
    """A dataset line that cannot become a prompt; the message is the reason."""


def parse_line(line: str) -> run_pb2.Conversation:
    """Parse one JSONL line into a ``Conversation`` or raise ``BadRow`` with the reason."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise BadRow("expected a JSON object with 'conversations' or 'messages'")
    turns = obj.get("conversations", obj.get("messages"))
    if turns is None:
        raise BadRow("no 'conversations' or 'messages' field")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' must be a non-empty list of turns")
    conv = run_pb2.Conversation()
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise BadRow(f"turn {i} has unknown role {role!r}")
        if not isinstance(content, str):
            raise BadRow(f"turn {i} has no text content")
        try:
            conv.messages.add(role=_ROLE_ALIASES[role.lower()], content=content)
        except UnicodeEncodeError as exc:  # a lone surrogate: JSON allows it, UTF-8 does not
            raise BadRow(f"turn {i} text is not valid Unicode: {exc.reason} at character "
                         f"{exc.start}") from None
    if not any(m.role == "assistant" for m in conv.messages):
        raise BadRow("no assistant turn: nothing to train on")
    return conv


def prompt_id(conv: run_pb2.Conversation) -> str:
    """Content hash of a conversation: identical prompts get the same id."""
    canonical = json.dumps([[m.role, m.content] for m in conv.messages], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def sample_id(prompt: str, epoch: int) -> str:
    return f"{prompt}:e{epoch}"
