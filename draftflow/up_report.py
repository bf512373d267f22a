"""What ``draftflow up`` tells the user at the end: the run's accounting and how good the draft is.

The draft's figures come from the trainer's own ``TrainerService.GetStatus`` (top-1 accuracy per
unroll position and the simulated acceptance length of each step), averaged over the last steps
the trainer reported, and are set beside chance (one over the draft vocabulary). The same figures
are written to ``OUT/summary.json`` for scripts.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from services.api import coordinator_pb2 as cpb
from services.api import trainer_pb2, trainer_pb2_grpc
from services.rpc.client import open_channel

WINDOW_STEPS = 20
"""Steps averaged for the accuracy figures: one step's batch is too small to read alone."""


@dataclass
class TrainerFigures:
    """The trainer's figures, averaged over its last ``WINDOW_STEPS`` reported steps."""

    steps_seen: int = 0
    accuracies: list[float] = field(default_factory=list)
    acceptance_length: float = 0.0
    samples_per_second: float = 0.0
    data_wait_fraction: float = 0.0
    device: str = ""
    majority_accuracy: float = 0.0
    """Top-1 of always guessing the most frequent next token (0: not reported)."""
    extras: dict[str, float] = field(default_factory=dict)
    """Strategy figures shown beside the common ones (Domino's base head and lambda), averaged
    like the accuracies."""


EXTRA_FIGURES = ("base_accuracy", "base_accept_len", "base_loss", "lambda_base")
"""Strategy metrics the summary shows when a trainer reports them."""


def final_figures(path: Path) -> TrainerFigures | None:
    """The figures of the last step trained, from the status file a trainer writes when it ends
    (for a run whose steps all passed between two polls, or had none left); None if none."""
    from google.protobuf import json_format

    try:
        last = json_format.Parse(path.read_text(), trainer_pb2.TrainerGetStatusResponse())
    except (OSError, json_format.ParseError):
        return None
    if not last.accuracies:
        return None
    return TrainerFigures(
        steps_seen=1, accuracies=list(last.accuracies),
        acceptance_length=last.simulated_acceptance_length,
        samples_per_second=last.samples_per_second,
        data_wait_fraction=last.data_wait_fraction, device=last.device,
        majority_accuracy=last.majority_accuracy,
        extras={k: last.metrics[k] for k in EXTRA_FIGURES if k in last.metrics})


class TrainerWatch:
    """Polls a trainer's ``GetStatus`` and keeps the last steps' figures."""

    def __init__(self, target: Callable[[], str | None]) -> None:
        """``target()`` gives the trainer's HOST:PORT once it is listening, else None."""
        self._target = target
        self._channel: grpc.Channel | None = None
        self._steps: deque[trainer_pb2.TrainerGetStatusResponse] = deque(maxlen=WINDOW_STEPS)
        self._last: trainer_pb2.TrainerGetStatusResponse | None = None

    def poll(self) -> None:
        """One status read; a trainer that is starting or gone is not an error here."""
        if self._channel is None:
            target = self._target()
            if target is None:
                return
            self._channel = open_channel(target)
        stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        try:
            reply = stub.GetStatus(trainer_pb2.TrainerGetStatusRequest(), timeout=1.0)
        except grpc.RpcError:
            # A fresh channel next time: one that failed while the trainer was starting backs
            # off for seconds and would miss a short run.
            self.close()
            return
        self.record(reply)

    def record(self, reply: trainer_pb2.TrainerGetStatusResponse) -> None:
        """Keep one status read (a new step's figures join the window)."""
        self._last = reply
        if reply.step > 0 and reply.accuracies and (
                not self._steps or self._steps[-1].step != reply.step):
            self._steps.append(reply)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def figures(self) -> TrainerFigures:
        if not self._steps or self._last is None:
            return TrainerFigures()
        n = len(self._steps)
        positions = min(len(s.accuracies) for s in self._steps)
        return TrainerFigures(
            steps_seen=n,
            accuracies=[sum(s.accuracies[k] for s in self._steps) / n for k in range(positions)],
            acceptance_length=sum(s.simulated_acceptance_length for s in self._steps) / n,
            samples_per_second=self._last.samples_per_second,
            data_wait_fraction=self._last.data_wait_fraction,
            device=self._last.device,
            majority_accuracy=self._last.majority_accuracy,
            extras={k: sum(s.metrics[k] for s in self._steps) / n for k in EXTRA_FIGURES
                    if all(k in s.metrics for s in self._steps)},
        )


@dataclass
class Summary:
    """The end of a ``draftflow up``: accounting from the coordinator, figures from the trainer."""

    run_id: str
    steps: int
    final_loss: float
    samples: dict[str, int]
    prompts: dict[str, int]
    chance_accuracy: float
    trainer: TrainerFigures
    seconds: float
    draft: str
    algorithm: str = "eagle3"

    @staticmethod
    def of(status: cpb.RunStatus, figures: TrainerFigures, draft_vocab_size: int,
           seconds: float, draft: Path, algorithm: str = "eagle3") -> Summary:
        """``draft_vocab_size``: the vocabulary the draft predicts over (chance is one over it)."""
        return Summary(
            run_id=status.run_id, steps=status.last_committed_step,
            final_loss=status.last_step_loss, samples=dict(status.samples),
            prompts=dict(status.prompts), chance_accuracy=1.0 / max(draft_vocab_size, 1),
            trainer=figures, seconds=seconds, draft=str(draft), algorithm=algorithm)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    def print(self, console: Console, out_dir: Path, title: str = "draftflow up — done"
              ) -> None:
        s = self.samples
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        table.add_row("samples", f"{s.get('TRAINED', 0) + s.get('RETIRED', 0)} trained, "
                      f"{s.get('DROPPED', 0)} dropped (end-of-data tail), "
                      f"{s.get('DEAD', 0)} dead, {s.get('LOST', 0)} lost")
        table.add_row("steps", f"{self.steps}, final loss {self.final_loss:.4f}")
        t = self.trainer
        if t.accuracies:
            shown = "  ".join(f"{a:.3f}" for a in t.accuracies)
            last = f"last {t.steps_seen} steps" if t.steps_seen > 1 else "last step"
            where = ("unroll positions" if self.algorithm == "eagle3"
                     else "block positions after the anchor")
            table.add_row("top-1 accuracy", f"{shown}  ({where} 1..{len(t.accuracies)}, "
                          f"{last})")
            table.add_row("acceptance length", f"{t.acceptance_length:.2f} tokens per "
                          f"verification (simulated; 1.00 = draft never accepted)")
            vocabulary = "draft" if self.algorithm == "eagle3" else "target"
            table.add_row("chance", f"{self.chance_accuracy:.4f} top-1 (uniform over the "
                          f"{vocabulary} vocabulary)")
            for key, value in sorted(t.extras.items()):
                table.add_row(key.replace("_", " "), f"{value:.3f}")
            if t.majority_accuracy:
                verdict = ("the draft beats it" if t.accuracies[0] > t.majority_accuracy
                           else "the draft does not beat it yet")
                table.add_row("baseline", f"{t.majority_accuracy:.3f} top-1 always guessing the "
                              f"most frequent next token ({verdict})")
            table.add_row("trainer", f"{t.samples_per_second:.1f} samples/s on {t.device}, "
                          f"{100 * t.data_wait_fraction:.1f}% waiting for data")
        _extra_metrics(table, out_dir / "metrics.json")
        table.add_row("time", f"{self.seconds:.0f} s")
        table.add_row("draft", self.draft)
        console.print(table)
        served = "EAGLE3" if self.algorithm == "eagle3" else "DFLASH"
        console.print("serve it: python -m sglang.launch_server --model-path TARGET "
                      f"--speculative-algorithm {served} --speculative-draft-model-path "
                      f"{self.draft}")


def _extra_metrics(table: Table, path: Path) -> None:
    """Evaluation figures the trainer may leave beside its output, shown as they are."""
    if not path.is_file():
        return
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for key, value in sorted(metrics.items()):
        if isinstance(value, float | int):
            table.add_row(key.replace("_", " "), f"{value:.4g}")
        elif isinstance(value, list) and all(isinstance(v, float | int) for v in value):
            table.add_row(key.replace("_", " "), "  ".join(f"{v:.3f}" for v in value))


class RunProgress:
    """The capture and train bars both ``draftflow up`` and ``draftflow train`` show, fed from
    the coordinator's run status."""

    def __init__(self, console: Console, show: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not show)
        self._capture: TaskID | None = None
        self._train: TaskID | None = None

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        self._capture = self.progress.add_task("capture", total=None, rate="")
        self._train = self.progress.add_task("train", total=None, rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def show(self, status: cpb.RunStatus) -> None:
        assert self._capture is not None and self._train is not None
        total = sum(status.prompts.values()) - status.prompts["DEAD"]
        self.progress.update(self._capture, total=total, completed=status.prompts["CAPTURED"],
                             rate=f"{status.samples_committed_per_second:6.1f} samples/s")
        self.progress.update(self._train, total=status.total_steps_estimate or None,
                             completed=status.last_committed_step,
                             rate=f"{status.steps_committed_per_second:6.2f} steps/s  "
                                  f"loss {status.last_step_loss:.3f}")
