"""Step metrics as TensorBoard scalars under ``OUT/tensorboard``, written by rank 0.

TensorBoard is an optional dependency (``pip install 'draftflow[tensorboard]'``). Without it the
trainer says so once, with an ``action`` log line, and trains on; the run's history is still
recorded by the coordinator (``GetRunHistory``, ``draftflow report``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.logs import event

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """One scalar per metric and step, each metric under its own name (``loss``, ``acc_0``...).

    A resumed run writes into the same directory with ``purge_step`` set to its first step, so
    TensorBoard hides what the earlier process logged past the checkpoint: one curve per metric.
    """

    def __init__(self, out_dir: Path, first_step: int, run_id: str) -> None:
        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no event files are written; install "
                        "draftflow[tensorboard] to get them", extra=event(
                            "tensorboard_unavailable", run_id=run_id))
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
