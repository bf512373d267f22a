"""DraftFlow's SGLang plugin: prefill hidden states go from the scheduler into the feature store.

SGLang loads it in every scheduler process through the ``sglang.srt.plugins`` entry point
(``draftflow_capture = producer.sglang_plugin:register``, declared in pyproject.toml), so
installing draftflow in the server's environment is the whole installation. The plugin acts only
on requests that carry a ``CaptureTarget`` (see ``wire``); every other request is served as usual.

Environment of the SGLang server:
    DRAFTFLOW_STORE_URL          the feature store to write to (same as the producer's)
    DRAFTFLOW_CAPTURE_STAGING_MB initial size of the reused host staging buffer (default 256)
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from producer.sglang_plugin import gate
from producer.sglang_plugin.hooks import DEFAULT_STAGING_BYTES, CaptureHooks
from services.logs import event
from services.store.base import FeatureStore

log = logging.getLogger(__name__)

STORE_URL_ENV = "DRAFTFLOW_STORE_URL"
STAGING_MB_ENV = "DRAFTFLOW_CAPTURE_STAGING_MB"
_MARK = "__draftflow_capture_original__"


def open_store_from_env() -> FeatureStore:
    """Open the store named by ``DRAFTFLOW_STORE_URL`` (first capture batch, scheduler process)."""
    url = os.environ.get(STORE_URL_ENV)
    if not url:
        raise RuntimeError(
            f"{STORE_URL_ENV} is not set in the SGLang server's environment: set it to the "
            "producer's feature store URL and restart the server"
        )
    from services.store import open_store  # type: ignore[attr-defined]

    return open_store(url)


def staging_bytes_from_env() -> int:
    raw = os.environ.get(STAGING_MB_ENV)
    if not raw:
        return DEFAULT_STAGING_BYTES
    try:
        mb = int(raw)
    except ValueError as exc:
        raise ValueError(f"{STAGING_MB_ENV}={raw!r}: must be a whole number of MiB") from exc
    if mb <= 0:
        raise ValueError(f"{STAGING_MB_ENV}={raw!r}: must be > 0")
    return mb << 20


def install(
    processor_cls: type,
    streamer_cls: type,
    *,
    version: str,
    hooks: CaptureHooks | None = None,
) -> CaptureHooks:
    """Check SGLang's version and hooked signatures, then wrap the three methods.

    Raises ``gate.IncompatibleSGLang`` (and wraps nothing) when anything differs. Installing twice
    is refused: one process has one capture state.
    """
    tested = gate.check_version(version)
    owners = {gate.PROCESSOR_MODULE: processor_cls, gate.STREAMER_MODULE: streamer_cls}
    for hooked in gate.HOOKED_METHODS:
        gate.check_method(owners[hooked.module], hooked)
    gate.check_fields(processor_cls, ("output_streamer",))
    gate.check_fields(streamer_cls, ("send_to_detokenizer", "server_args"))
    if any(hasattr(getattr(c, h.method), _MARK) for c, h in _targets(owners)):
        raise RuntimeError("the draftflow capture hooks are already installed in this process")
    if not tested:
        log.warning(
            "SGLang %s is newer than the versions the capture plugin was read against (%s); "
            "the hooked signatures match, installing",
            version,
            ", ".join(sorted(gate.TESTED_VERSIONS)),
            extra=event("capture_plugin_untested_version", version=version),
        )
    hooks = hooks or CaptureHooks(open_store_from_env, staging_bytes_from_env())
    wrappers: dict[str, Callable[..., Any]] = {
        "process_batch_result_prefill": hooks.around_process_prefill,
        "_append_prefill_hidden_states": hooks.around_append,
        "stream_output": hooks.before_stream,
    }
    for owner, hooked in _targets(owners):
        _wrap(owner, hooked.method, wrappers[hooked.method])
    log.info(
        "draftflow capture hooks installed on SGLang %s",
        version,
        extra=event("capture_plugin_installed", version=version),
    )
    return hooks


def uninstall(processor_cls: type, streamer_cls: type) -> None:
    """Restore the wrapped methods (tests, or a process that stops capturing)."""
    owners = {gate.PROCESSOR_MODULE: processor_cls, gate.STREAMER_MODULE: streamer_cls}
    for owner, hooked in _targets(owners):
        current = owner.__dict__.get(hooked.method)
        original = getattr(current, _MARK, None)
        if original is not None:
            setattr(owner, hooked.method, original)


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: install the hooks on the real SGLang classes.

    SGLang logs and carries on when a plugin raises, so an incompatible SGLang is also logged
    at CRITICAL here; the producer's start-up probe then refuses the server because no ref comes
    back.
    """
    import sglang
    from sglang.srt.managers.scheduler_components import batch_result_processor, output_streamer

    try:
        install(
            batch_result_processor.SchedulerBatchResultProcessor,
            output_streamer.SchedulerOutputStreamer,
            version=sglang.__version__,
        )
    except gate.IncompatibleSGLang as exc:
        log.critical(
            "draftflow capture plugin NOT installed: %s",
            exc,
            extra=event("capture_plugin_refused", version=sglang.__version__),
        )
        raise


def _targets(owners: dict[str, type]) -> list[tuple[type, gate.HookedMethod]]:
    return [(owners[h.module], h) for h in gate.HOOKED_METHODS]


def _wrap(owner: type, name: str, hook: Callable[..., Any]) -> None:
    original = owner.__dict__[name]

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return hook(original, *args, **kwargs)

    setattr(wrapper, _MARK, original)
    setattr(owner, name, wrapper)
