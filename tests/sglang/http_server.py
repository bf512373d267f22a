"""A local HTTP server that answers like SGLang's ``/server_info`` and ``/generate``.

Requests go through a ``FakeScheduler`` on the hooked fake classes, so the refs in its answers
are the plugin's own. ``mode`` makes it misbehave the ways a real deployment can.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from producer.sglang_plugin import wire
from tests.sglang import fakes

# The fake scheduler classes hold one capture state per process; SGLang servers are separate
# processes, so the fake servers of one test take turns.
_SCHEDULER_LOCK = threading.Lock()


class FakeSGLangServer:
    """``with FakeSGLangServer(...) as srv: srv.url``; counts what the producer sent."""

    def __init__(
        self, hidden: int, aux_layers: list[int], *, server_args: dict[str, Any] | None = None
    ) -> None:
        self.scheduler = fakes.FakeScheduler(hidden, aux_layers, server_args=server_args)
        self.args = self.scheduler.args
        self.mode = "ok"
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokens_in_flight = 0
        self.max_tokens_in_flight = 0
        self.release = threading.Event()
        self.release.set()
        self._count = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeSGLangServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def generate(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        tokens = len(body["input_ids"])
        with self._count:
            self.bodies.append(body)
            self.in_flight += 1
            self.tokens_in_flight += tokens
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_tokens_in_flight = max(self.max_tokens_in_flight, self.tokens_in_flight)
        try:
            # Lets a test hold requests open to see how many the producer keeps in flight.
            self.release.wait(timeout=30)
            if self.mode == "error500":
                return 500, {"error": {"message": "scheduler died"}}
            with _SCHEDULER_LOCK:
                [response] = self.scheduler.run([body])
            meta = response["meta_info"]
            if self.mode == "no_plugin":
                meta.pop(wire.RESPONSE_KEY, None)
            elif self.mode == "wrong_length":
                meta[wire.RESPONSE_KEY][0]["num_tokens"] -= 1
            elif self.mode == "wrong_layers":
                meta[wire.RESPONSE_KEY][0]["aux_layer_ids"] = [0, 1, 2]
            elif self.mode == "extra_final":
                # A plugin on another layout: the ref also names a final state it wrote.
                tensors = meta[wire.RESPONSE_KEY][0]["tensors"]
                first = tensors[-1]
                key = first["key"].rsplit("/", 1)[0] + "/" + wire.HIDDEN_STATE
                tensors.append({**first, "name": wire.HIDDEN_STATE, "key": key})
            return 200, response
        finally:
            with self._count:
                self.in_flight -= 1
                self.tokens_in_flight -= tokens

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/server_info":
                    self._send(200, {**server.args, "internal_states": []})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                if self.path != "/generate":
                    self._send(404, {"detail": "Not Found"})
                    return
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                self._send(*server.generate(body))

            def _send(self, code: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test output is the record."""

        return Handler
