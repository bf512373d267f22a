"""Idle streams an unauthenticated client opens against a server: health ``Watch`` and server
reflection, the two streaming methods every DraftFlow server registers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


@dataclass
class Flood:
    """``n`` Watch and ``n`` reflection streams per target, held open until ``close``."""

    targets: list[str]
    n: int = 50
    channels: list[grpc.Channel] = field(default_factory=list)
    calls: list[object] = field(default_factory=list)
    _idle: threading.Event = field(default_factory=threading.Event)

    def open(self) -> None:
        for target in self.targets:
            channel = grpc.insecure_channel(target)
            self.channels.append(channel)
            health = health_pb2_grpc.HealthStub(channel)
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            for _ in range(self.n):
                self.calls.append(health.Watch(health_pb2.HealthCheckRequest()))
                self.calls.append(refl.ServerReflectionInfo(self._never()))

    def _never(self) -> Iterator[reflection_pb2.ServerReflectionRequest]:
        self._idle.wait()  # an idle client: the stream is open, nothing is ever asked
        yield from ()

    def outcomes(self) -> dict[str, int]:
        """How each stream ended (waits for every one): status code names, counted."""
        seen: dict[str, int] = {}
        for call in self.calls:
            code = call.code()  # type: ignore[attr-defined]
            seen[code.name] = seen.get(code.name, 0) + 1
        return seen

    def close(self) -> None:
        self._idle.set()
        for call in self.calls:
            call.cancel()  # type: ignore[attr-defined]
        for channel in self.channels:
            channel.close()
