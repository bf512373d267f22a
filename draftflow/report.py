"""A run's report: one self-contained HTML page of its history, plots drawn as inline SVG.

The page needs no network and no script: every plot is an ``<svg>`` built here from the
coordinator's ``GetRunHistory``. One plot per figure (loss, accuracy per unroll position,
simulated acceptance length, learning rate, data wait, ...); a figure with several series (one
per position) draws one polyline each. Steps whose value is NaN or infinite are left out of
the line and counted under the plot.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.api import coordinator_pb2 as cpb

PAGE_SIZE = 10_000
REPORT_FILE = "report.html"
"""Where `draftflow up` writes the report, in the run's output directory."""
WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 32
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
ACC = re.compile(r"^acc_(\d+)$")


@dataclass
class Plot:
    """One figure of the page: a title and the metric names drawn in it."""

    key: str
    title: str
    series: list[str] = field(default_factory=list)


def plots_for(names: Iterable[str]) -> list[Plot]:
    """The figures a history holds, in reading order; figures with no data are left out."""
    names = set(names)
    positions = sorted(int(m.group(1)) for n in names if (m := ACC.match(n)))
    fixed = [
        Plot("loss", "Loss", [n for n in ("loss", "base_loss") if n in names]),
        Plot("accuracy", "Top-1 accuracy per unroll position",
             [f"acc_{p}" for p in positions]),
        Plot("acceptance_length", "Simulated acceptance length",
             [n for n in ("acceptance_length", "base_accept_len") if n in names]),
        Plot("lr", "Learning rate", [n for n in ("lr",) if n in names]),
        Plot("data_wait_seconds", "Data wait per step (seconds)",
             [n for n in ("data_wait_seconds",) if n in names]),
        Plot("step_seconds", "Step time (seconds)", [n for n in ("step_seconds",) if n in names]),
        Plot("grad_norm", "Gradient norm", [n for n in ("grad_norm",) if n in names]),
        Plot("lambda_base", "Base-head weight (lambda)",
             [n for n in ("lambda_base",) if n in names]),
    ]
    return [p for p in fixed if p.series]


def fetch_history(stub: Any, run_id: str, timeout: float = 30.0) -> list[cpb.StepRecord]:
    """Every recorded step of ``run_id``, paging through ``GetRunHistory``."""
    records: list[cpb.StepRecord] = []
    token = ""
    while True:
        resp = stub.GetRunHistory(cpb.GetRunHistoryRequest(
            run_id=run_id, page_size=PAGE_SIZE, page_token=token), timeout=timeout)
        records.extend(resp.records)
        token = resp.next_page_token
        if not token:
            return records


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def svg_plot(plot: Plot, records: list[cpb.StepRecord]) -> str:
    """One ``<svg>``: a polyline per series over steps, with the axes' ranges labelled."""
    points = {name: [(r.step, r.metrics[name]) for r in records if name in r.metrics]
              for name in plot.series}
    finite = {name: [(s, v) for s, v in pts if math.isfinite(v)] for name, pts in points.items()}
    skipped = sum(len(points[n]) - len(finite[n]) for n in plot.series)
    every = [p for pts in finite.values() for p in pts]
    if every:
        x0, x1 = min(s for s, _ in every), max(s for s, _ in every)
        y0, y1 = min(v for _, v in every), max(v for _, v in every)
    else:
        x0 = x1 = y0 = y1 = 0
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + (abs(y0) or 1.0)
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(step: float, value: float) -> tuple[str, str]:
        return (f"{LEFT + (step - x0) / (x1 - x0) * w:.1f}",
                f"{TOP + (1 - (value - y0) / (y1 - y0)) * h:.1f}")

    parts = [
        f'<svg class="plot" data-metric="{plot.key}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{html.escape(plot.title)}">',
        f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="#fff" stroke="#999"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end">{_fmt(y1)}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + h}" text-anchor="end">{_fmt(y0)}</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}">step {x0}</text>',
        f'<text x="{LEFT + w}" y="{HEIGHT - 8}" text-anchor="end">step {x1}</text>',
    ]
    for i, name in enumerate(plot.series):
        color = COLORS[i % len(COLORS)]
        pts = finite[name]
        coords = [xy(s, v) for s, v in pts]
        if len(coords) == 1:  # a line needs two points; show a lone one as a dot
            parts.append(f'<circle cx="{coords[0][0]}" cy="{coords[0][1]}" r="3" '
                         f'fill="{color}"/>')
        parts.append(f'<polyline data-series="{name}" fill="none" stroke="{color}" '
                     f'stroke-width="1.5" points="{" ".join(",".join(c) for c in coords)}"/>')
    parts.append("</svg>")
    legend = " ".join(
        f'<span style="color:{COLORS[i % len(COLORS)]}">&#9632; {html.escape(name)}</span>'
        for i, name in enumerate(plot.series))
    note = f" ({skipped} NaN or infinite values not drawn)" if skipped else ""
    return (f'<figure><figcaption>{html.escape(plot.title)}</figcaption>{"".join(parts)}'
            f'<div class="legend">{legend}{note}</div></figure>')


def render(run_id: str, records: list[cpb.StepRecord], status: cpb.RunStatus | None = None
           ) -> str:
    """The whole page for ``records`` (in step order)."""
    names = {n for r in records for n in r.metrics}
    plots = plots_for(names)
    title = f"DraftFlow run {html.escape(run_id)}"
    facts = [f"{len(records)} steps recorded"]
    if records:
        facts.append(f"steps {records[0].step} to {records[-1].step}")
        last = records[-1].metrics
        facts += [f"last {n} {_fmt(last[n])}" for n in ("loss", "acceptance_length")
                  if n in last]
    if status is not None:
        facts.append(f"state {cpb.RunState.Name(status.state).removeprefix('RUN_STATE_')}")
    body = "".join(svg_plot(p, records) for p in plots) or "<p>No step is recorded yet.</p>"
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; }}
figure {{ margin: 0 0 24px 0; }}
figcaption {{ font-weight: bold; margin-bottom: 4px; }}
svg text {{ font-size: 11px; fill: #444; }}
.legend {{ font-size: 12px; }}
</style></head>
<body><h1>{title}</h1>
<p>{html.escape("; ".join(facts))}. Written {html.escape(made)}.</p>
{body}
</body></html>
"""


def write_report(stub: Any, run_id: str, path: Path) -> Path:
    """Fetch ``run_id``'s history and status and write the page to ``path``."""
    records = fetch_history(stub, run_id)
    status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id), timeout=30).status
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(run_id, records, status))
    return path
