"""A TCP proxy tests put in front of a server to cut the network to it and restore it.

``cut()`` resets every open connection and refuses new ones, as a dropped link or a restarting
database would look to a client; ``restore()`` forwards again. Nothing about the server behind
it changes, so a shared PostgreSQL never restarts for a test.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream`` (HOST, PORT) until ``close()``."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closed = False
        self.refused = 0
        """Connections refused while cut."""
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def cut(self) -> None:
        """Reset every open connection; refuse new ones until ``restore``."""
        with self._lock:
            self._cut = True
            doomed, self._open = self._open, set()
        for s in doomed:
            _reset(s)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                cut = self._cut
            if cut:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._cut:
                    cut = True
                else:
                    self._open.update((client, server))
            if cut:
                _reset(client)
                _reset(server)
                continue
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _reset(s: socket.socket) -> None:
    """Drop the connection: the peer sees it end mid-conversation.

    ``shutdown`` first: it wakes a pump thread blocked in ``recv`` on this socket, which a
    bare ``close`` would not (the blocked call keeps the socket open, and the peer waits on it
    forever)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
