"""Atomic checkpoints: a checkpoint directory either is complete or does not exist.

Layout: ``ROOT/step-000000042/{state.pt, meta.json}``. Files are written into a hidden temporary
directory, fsynced, and the directory is renamed into place, so a crash mid-write leaves only a
``.tmp-*`` directory that ``latest_complete`` ignores (and ``clean_partial`` removes).

A checkpoint is never reused or replaced by another trainer group: when ``step-000000042`` holds
another group's state (a superseded group that woke up, say), this group writes
``step-000000042-GROUP`` instead, and the coordinator's committed URI says which one counts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{9})$")
STEP_OF = re.compile(r"^step-(\d{9})(?:-[0-9a-zA-Z]+)?$")
"""Step of a checkpoint directory name, with or without a trainer group suffix."""
STATE_FILE, META_FILE = "state.pt", "meta.json"


def checkpoint_path(root: str | Path, step: int, group: str = "") -> Path:
    """Directory of the checkpoint taken after ``step`` (by ``group``, when it is not the first
    group to write one for this step)."""
    return Path(root) / (f"step-{step:09d}-{group}" if group else f"step-{step:09d}")


def _written_by(path: Path) -> str:
    try:
        return str(json.loads((path / META_FILE).read_text()).get("trainer_group", ""))
    except (OSError, ValueError):
        return "?"  # unreadable: not ours to reuse


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write ``state`` (tensors and plain values) and ``meta`` (JSON) for ``step``; return its path.

    Saving a step that already has a checkpoint of the same ``meta["trainer_group"]`` returns the
    existing one untouched; one of another group is left alone and this one goes beside it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    group = str(meta.get("trainer_group", ""))
    final = checkpoint_path(root, step)
    if final.exists() and _written_by(final) != group:
        final = checkpoint_path(root, step, group or uuid.uuid4().hex)
    if final.exists():
        return final
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, sort_keys=True))
        for name in (STATE_FILE, META_FILE):
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_complete(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if not m or not (entry / STATE_FILE).is_file() or not (entry / META_FILE).is_file():
            continue
        step = int(m.group(1))
        if best is None or step > best[0]:
            best = (step, entry)
    return best[1] if best else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(state, meta)`` of a checkpoint directory (tensors load on CPU)."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return state, meta


def clean_partial(root: str | Path) -> list[Path]:
    """Remove temporary directories left by interrupted saves; return what was removed."""
    root = Path(root)
    removed = [p for p in root.glob(".tmp-step-*") if p.is_dir()] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
