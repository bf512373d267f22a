"""Refuse to hook an SGLang whose hooked methods are not the ones this plugin was written against.

The plugin wraps three scheduler methods that are not public API. It installs only when SGLang's
version is at least the first release with the capture-only aux mode and every hooked method has
exactly the recorded parameter list; anything else raises ``IncompatibleSGLang`` naming what
differs, instead of capturing features from code paths nobody checked.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

MIN_VERSION = (0, 5, 23)
# Versions whose source the hooks were read against; newer ones pass if the signatures match.
TESTED_VERSIONS = frozenset({"0.5.23"})

PROCESSOR_MODULE = "sglang.srt.managers.scheduler_components.batch_result_processor"
STREAMER_MODULE = "sglang.srt.managers.scheduler_components.output_streamer"


class IncompatibleSGLang(RuntimeError):
    """The installed SGLang does not match what the capture hooks need."""


@dataclass(frozen=True)
class HookedMethod:
    """One method the plugin wraps, with its parameter list as recorded from SGLang's source."""

    module: str
    cls: str
    method: str
    signature: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.cls}.{self.method}"


HOOKED_METHODS = (
    HookedMethod(
        PROCESSOR_MODULE,
        "SchedulerBatchResultProcessor",
        "process_batch_result_prefill",
        "(self, batch, result)",
    ),
    HookedMethod(
        PROCESSOR_MODULE,
        "SchedulerBatchResultProcessor",
        "_append_prefill_hidden_states",
        "(self, *, req, logits_output, hidden_state_offset, capture_hidden_mode, "
        "extend_input_len, store=True)",
    ),
    HookedMethod(
        STREAMER_MODULE,
        "SchedulerOutputStreamer",
        "stream_output",
        "(self, reqs, return_logprob, skip_req=None)",
    ),
)


def parse_version(version: str) -> tuple[int, int, int]:
    """``"0.5.23.post1"`` -> ``(0, 5, 23)``; raise ``IncompatibleSGLang`` if unreadable."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        raise IncompatibleSGLang(f"cannot read SGLang version {version!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_version(version: str) -> bool:
    """Raise if ``version`` predates the capture-only aux mode; return whether it was tested."""
    if parse_version(version) < MIN_VERSION:
        wanted = ".".join(str(p) for p in MIN_VERSION)
        raise IncompatibleSGLang(
            f"SGLang {version} has no capture-only aux hidden-state mode; install sglang>={wanted}"
        )
    return version in TESTED_VERSIONS


def signature_shape(fn: Callable[..., object]) -> str:
    """A parameter list without annotations: names, kinds and defaults are the contract."""
    parts: list[str] = []
    star_done = False
    for param in inspect.signature(fn).parameters.values():
        if param.kind is param.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if param.kind is param.VAR_POSITIONAL:
            parts.append(f"*{param.name}")
            star_done = True
            continue
        if param.kind is param.VAR_KEYWORD:
            parts.append(f"**{param.name}")
            continue
        text = param.name
        if param.default is not param.empty:
            text += f"={param.default!r}"
        parts.append(text)
    return "(" + ", ".join(parts) + ")"


def check_method(owner: type, hooked: HookedMethod) -> None:
    """Raise ``IncompatibleSGLang`` unless ``owner.method`` has the recorded parameter list."""
    fn = owner.__dict__.get(hooked.method)
    if fn is None:
        raise IncompatibleSGLang(
            f"{hooked.qualname} does not exist in this SGLang; the capture hook cannot attach"
        )
    if isinstance(fn, staticmethod | classmethod):
        fn = fn.__func__
    found = signature_shape(fn)
    if found != hooked.signature:
        raise IncompatibleSGLang(
            f"{hooked.qualname} has signature {found}, the capture plugin was written for "
            f"{hooked.signature}; use an SGLang version the plugin supports "
            f"({', '.join(sorted(TESTED_VERSIONS))})"
        )


def check_fields(owner: type, fields: tuple[str, ...]) -> None:
    """Raise unless the dataclass ``owner`` declares every name in ``fields``."""
    declared = getattr(owner, "__dataclass_fields__", {})
    missing = [f for f in fields if f not in declared]
    if missing:
        raise IncompatibleSGLang(
            f"{owner.__module__}.{owner.__qualname__} lacks the fields {missing}; the capture "
            "hook reads them"
        )
