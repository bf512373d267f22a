"""Prometheus gauges of every active run, read from the database when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.manager import Coordinator


class RunStatusCollector(Collector):
    """Prompts and samples by state, steps and bytes in flight, labelled by run."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        prompts = GaugeMetricFamily("draftflow_prompts", "Work items by state",
                                    labels=["run_id", "state"])
        samples = GaugeMetricFamily("draftflow_samples", "Samples by state",
                                    labels=["run_id", "state"])
        step = GaugeMetricFamily("draftflow_last_committed_step", "Last committed step",
                                 labels=["run_id"])
        inflight = GaugeMetricFamily("draftflow_bytes_in_flight",
                                     "Bytes of READY and ASSIGNED samples", labels=["run_id"])
        try:
            runs = [r for r in self.coordinator.list_runs() if r.state == 1]
            statuses = [self.coordinator.run_status(r.run_id) for r in runs]
        except Exception:  # the database is down: /metrics still answers, health says why
            statuses = []
        for st in statuses:
            for state, n in st.prompts.items():
                prompts.add_metric([st.run_id, state], n)
            for state, n in st.samples.items():
                samples.add_metric([st.run_id, state], n)
            step.add_metric([st.run_id], st.last_committed_step)
            inflight.add_metric([st.run_id], st.bytes_in_flight)
        yield from (prompts, samples, step, inflight)
