"""A whole DraftFlow deployment as separate OS processes, for end-to-end tests.

Every role runs through the real ``draftflow`` command (the trainer under ``torchrun``), talks
over real sockets, and can be killed with SIGKILL and started again. A ``Node`` says where a
process runs: on this host, or inside a network namespace through ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.store.mooncake_proc import MasterHandle, free_port, start_master

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "examples" / "data" / "conversations.jsonl"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
STATUS_RPC = "draftflow.v1.CoordinatorService/GetRunStatus"
# Small processes on a small machine: one thread each keeps them from starving each other.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Node:
    """Where processes run: ``prefix`` wraps their argv, ``addr`` is how others reach them."""

    name: str
    addr: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()

    def port(self) -> int:
        # Nothing else lives in a namespace a test made, so a fixed port is free there.
        return free_port(self.addr) if not self.prefix else 0


@dataclass(frozen=True)
class Geometry:
    """Step geometry of the test run: world size W, micro-batch B, accumulation A."""

    world: int = 2
    micro: int = 2
    accum: int = 1

    @property
    def per_step(self) -> int:
        return self.world * self.micro * self.accum


@dataclass(frozen=True)
class RunSpec:
    """The run every e2e test trains: the first ``prompts`` example conversations."""

    run_id: str = "e2e"
    prompts: int = 30
    epochs: int = 2
    geometry: Geometry = Geometry()
    checkpoint_every: int = 4
    # A low watermark keeps producers only a few samples ahead of the trainer, so a fault
    # injected once training has started still finds work on both sides.
    high_samples: int = 8
    low_samples: int = 4
    # Missed 1 s heartbeats before a session expires: it outlives a coordinator restart.
    heartbeat_misses: int = 30

    @property
    def samples(self) -> int:
        return self.prompts * self.epochs

    @property
    def final_step(self) -> int:
        return self.samples // self.geometry.per_step


def write_run_config(directory: Path, target: Path, spec: RunSpec) -> Path:
    """Dataset and run YAML for ``spec`` in ``directory``; returns the YAML path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "conversations.jsonl"
    lines = DATASET.read_text().splitlines()[: spec.prompts]
    data.write_text("\n".join(lines) + "\n")
    g = spec.geometry
    cfg = {
        "run_id": spec.run_id, "dataset": str(data), "epochs": spec.epochs,
        "target": {"model_path": str(target), "revision": "e2e"},
        "capture": {"max_length": 128},
        "draft": {"draft_vocab_size": 128, "ttt_length": 2},
        "step": {"world_size": g.world, "micro_batch": g.micro, "accumulation": g.accum},
        "training": {"learning_rate": 1e-3, "checkpoint_every": spec.checkpoint_every},
        # Leases of a killed producer come back after 6 s; sessions outlive a coordinator
        # restart of several seconds (30 missed heartbeats), as they would in production.
        "lease": {"lease_seconds": 6, "heartbeat_seconds": 1,
                  "heartbeat_misses": spec.heartbeat_misses},
        "watermark": {"high_samples": spec.high_samples, "low_samples": spec.low_samples,
                      "retry_after_seconds": 0.2},
    }
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Proc:
    """One started process (its own process group, so SIGKILL takes its children too)."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and every descendant: a crash, not a shutdown.

        torchrun starts each rank in a session of its own, so killing its process group alone
        would leave the ranks training on as orphans.
        """
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(
            self.log().splitlines()[-lines:])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def spawn(name: str, argv: Sequence[str], node: Node, log_dir: Path) -> Proc:
    """Start ``argv`` on ``node`` in a process group of its own, logging to ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path, k = log_dir / f"{name}.log", 1
    while log_path.exists():  # a restarted role gets a log of its own
        k += 1
        log_path = log_dir / f"{name}.{k}.log"
    full = [*node.prefix, *argv]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env={**os.environ, **CHILD_ENV})
    return Proc(name, full, log_path, process)


def draftflow_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftflow", "--log-format", "json", *args]


@dataclass
class Cluster:
    """Coordinator, Mooncake master (and an optional holder), producers and a trainer group."""

    workdir: Path
    db_url: str
    target: Path
    spec: RunSpec
    control: Node = Node("control")
    producer_node: Node = Node("producer")
    trainer_node: Node = Node("trainer")
    token: str | None = None
    holder_mb: int = 0
    """Memory a holder on the control node lends the pool; 0: producers lend their own."""
    producer_segment_mb: int = 32
    procs: dict[str, Proc] = field(default_factory=dict)
    crashed: list[Proc] = field(default_factory=list)
    master: MasterHandle | None = None
    coordinator_addr: str = ""
    trainer_listen: str = ""

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def out_dir(self) -> Path:
        return self.workdir / "out"

    # -- starting -----------------------------------------------------------------------------

    def start(self, producers: int = 2, trainer: bool = True,
              exit_when_captured: bool = False) -> None:
        """Everything, in order; returns once the run exists and every role was started."""
        self.start_master()
        if self.holder_mb:
            self.start_holder()
        self.coordinator_addr = f"{self.control.addr}:{self.control.port() or 50051}"
        self.start_coordinator()
        self.create_run()
        for i in range(producers):
            self.start_producer(i, exit_when_captured)
        # Port 0 on the host: the trainer binds a free port itself, so no other process can
        # take it between choosing and binding; inside a namespace the default port is free.
        self.trainer_listen = f"{self.trainer_node.addr}:{50053 if self.trainer_node.prefix else 0}"
        if trainer:
            self.start_trainer()

    def start_master(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fixed = bool(self.control.prefix)
        self.master = start_master(
            host=self.control.addr, rpc_port=50061 if fixed else 0,
            metrics_port=9003 if fixed else 0, client_ttl_s=3,
            log_path=self.workdir / "mooncake-master.log", prefix=list(self.control.prefix))

    def restart_master(self) -> None:
        assert self.master is not None
        self.master.kill()
        self.master.process = self.master.restart().process

    def start_holder(self) -> None:
        assert self.master is not None
        argv = [sys.executable, "-m", "services.store.holder", "--master", self.master.address,
                "--segment-mb", str(self.holder_mb), "--local", self.control.addr]
        proc = spawn("holder", argv, self.control, self.log_dir)
        self.procs["holder"] = proc
        wait_for(lambda: "ready " in proc.log() or not proc.alive(), 60, "holder mounted")
        assert proc.alive(), proc.tail()

    def store_url(self, node: Node, segment_mb: int = 0) -> str:
        assert self.master is not None
        return self.master.url("e2e", local=node.addr, segment_mb=segment_mb, buffer_mb=16)

    def auth(self) -> list[str]:
        return ["--token", self.token] if self.token else []

    def start_coordinator(self) -> Proc:
        argv = draftflow_argv("coordinator", "--listen", self.coordinator_addr, "--db",
                              self.db_url, "--metrics-port", "-1", *self.auth())
        proc = spawn("coordinator", argv, self.control, self.log_dir)
        self.procs["coordinator"] = proc
        wait_for(lambda: "coordinator listening on port" in proc.log() or not proc.alive(),
                 60, "coordinator listening")
        assert proc.alive(), proc.tail()
        return proc

    def restart_coordinator(self) -> None:
        """SIGKILL the coordinator and start it again on the same address and database."""
        self.crash("coordinator")
        self.start_coordinator()

    def create_run(self) -> None:
        config = write_run_config(self.workdir / "config", self.target, self.spec)
        out = subprocess.run(
            [*self.control.prefix, sys.executable, "-m", "draftflow", "run", "create",
             str(config), "--coordinator", self.coordinator_addr, *self.auth()],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr

    def _role_args(self) -> list[str]:
        return ["--coordinator", self.coordinator_addr, "--run", self.spec.run_id,
                "--model-path", str(self.target), "--metrics-port", "-1", *self.auth()]

    def start_producer(self, i: int, exit_when_captured: bool = False) -> Proc:
        segment = 0 if self.holder_mb else self.producer_segment_mb
        argv = draftflow_argv(
            "producer", *self._role_args(), "--device", "cpu",
            "--store", self.store_url(self.producer_node, segment), "--lease-batch", "2",
            "--listen",
            f"{self.producer_node.addr}:{50052 + 10 * i if self.producer_node.prefix else 0}",
            *(["--exit-when-captured"] if exit_when_captured else []))
        proc = spawn(f"producer-{i}", argv, self.producer_node, self.log_dir)
        self.procs[f"producer-{i}"] = proc
        return proc

    def start_trainer(self, name: str = "trainer") -> Proc:
        world = self.spec.geometry.world
        args = ["trainer", *self._role_args(), "--device", "cpu",
                "--store", self.store_url(self.trainer_node), "--out", str(self.out_dir),
                "--listen", self.trainer_listen]
        if world > 1:
            # torchrun's own parser takes `--run` for an ambiguous `--run-path`.
            args[args.index("--run")] = "--run-id"
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={world}", "-m", "draftflow", "--log-format", "json", *args]
        else:
            argv = draftflow_argv(*args)
        proc = spawn(name, argv, self.trainer_node, self.log_dir)
        self.procs["trainer"] = proc
        return proc

    # -- watching -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GetRunStatus`` through ``grpcurl`` and server reflection, as an operator asks."""
        headers = ["-H", f"authorization: Bearer {self.token}"] if self.token else []
        out = subprocess.run(
            [*self.control.prefix, GRPCURL, "-plaintext", *headers, "-d",
             json.dumps({"run_id": self.spec.run_id}), self.coordinator_addr, STATUS_RPC],
            capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise ConnectionError(out.stderr.strip())
        return json.loads(out.stdout)["status"]

    def committed_step(self) -> int:
        try:
            return int(self.status().get("last_committed_step", 0))
        except ConnectionError:
            return 0

    def wait_done(self, timeout_s: float = 180.0) -> dict[str, Any]:
        """Wait until the trainer exits; returns the final status. Fails on a crashed role."""
        deadline = time.monotonic() + timeout_s
        trainer = self.procs["trainer"]
        while trainer.alive():
            for proc in self.procs.values():
                code = proc.process.poll()
                if code not in (None, 0):
                    raise AssertionError(f"{proc.name} exited with {code}\n{self.tails()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"run not done after {timeout_s} s; status "
                                     f"{self.safe_status()}\n{self.tails()}")
            time.sleep(0.5)
        assert trainer.process.returncode == 0, self.tails()
        for name, proc in self.procs.items():
            if name.startswith("producer"):
                assert proc.process.wait(timeout=60) == 0, self.tails()
        return self.status()

    def safe_status(self) -> dict[str, Any] | str:
        try:
            return self.status()
        except ConnectionError as exc:
            return str(exc)

    def crash(self, name: str) -> Proc:
        """SIGKILL a role; it no longer counts as part of the cluster's health."""
        proc = self.procs.pop(name)
        proc.kill()
        self.crashed.append(proc)
        return proc

    def wait_step(self, step: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until ``step`` is committed; the status then (the run must still be going)."""
        wait_for(lambda: self.committed_step() >= step, timeout_s, f"step {step} committed")
        status = self.status()
        assert status["state"] == "RUN_STATE_ACTIVE", status
        return status

    def tails(self) -> str:
        return "\n".join(p.tail() for p in [*self.crashed, *self.procs.values()])

    def stop(self) -> None:
        """Stop everything this cluster started, whatever state it is in."""
        for proc in reversed([*self.crashed, *self.procs.values()]):
            proc.kill()
        if self.master is not None:
            self.master.kill()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)
