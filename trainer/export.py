"""Export a trained draft into a servable directory, atomically (temp dir, fsync, rename)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from torch import nn

from trainer.loop import Trainer


def export_draft(trainer: Trainer, out_dir: str | Path, overwrite: bool = False,
                 model: nn.Module | None = None) -> list[str]:
    """Write the strategy's servable files for ``trainer``'s model into ``out_dir``.

    ``model`` replaces ``trainer.model`` as the source of weights (an unsharded copy of an
    FSDP-sharded draft).

    Returns the tensor names written. An existing ``out_dir`` is refused unless ``overwrite``,
    in which case it is replaced only once the new export is complete.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        names = trainer.strategy.export(model if model is not None else trainer.model, tmp,
                                        trainer.settings)
        # safetensors writes 0600; a served draft is read by other users (SGLang, a host
        # reading a container's volume), so files get the mode the umask allows, as open() gives.
        mode = 0o666 & ~_umask()
        for f in tmp.iterdir():
            os.chmod(f, mode)
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _umask() -> int:
    """This process's umask, read without changing it where Linux allows (threads write files
    meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
