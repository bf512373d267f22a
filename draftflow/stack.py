"""Child processes of ``draftflow up``: start, watch, and stop them in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int = 0
    """Size of the log before this process started: its own lines come after."""

    def own_log(self) -> str:
        """What this process wrote to its log (logs are appended across runs)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Stack:
    """Processes started in order and stopped in reverse order."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            offset = log.tell()
            process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        child = Child(name, process, log_path, offset)
        self.children.append(child)
        return child

    def python(self, name: str, module_args: Sequence[str], env: dict[str, str] | None = None
               ) -> Child:
        return self.start(name, [sys.executable, "-m", *module_args], env)

    def stop(self, child: Child, timeout_s: float = 20.0) -> None:
        if child.alive():
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for child in reversed(self.children):
            self.stop(child, timeout_s)

    def failed(self, expected_exits: Sequence[str] = ()) -> Child | None:
        """The first child that exited on its own with an error (or at all, if not expected)."""
        for child in self.children:
            code = child.process.poll()
            if code is None:
                continue
            if code != 0 or child.name not in expected_exits:
                return child
        return None

    def wait_exit(self, child: Child, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = child.process.poll()
            if code is not None:
                return code
            time.sleep(0.2)
        return None
