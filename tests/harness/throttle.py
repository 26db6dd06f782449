"""A throttling TCP relay for tests: between the target and the legacy server's IMAP/POP3 ports.

Copies on loopback finish in well under a second, so a test that must act *during* a phase (copying, cutover)
cannot. Pointing the target's [legacy] imap_port/pop3_port at a Relay makes everything from the legacy server
(the copier's FETCHes, proxied sessions, password checks) arrive at `rate` bytes per second per connection,
so phases last seconds. Bytes toward the legacy server pass at once. TLS (STARTTLS) passes through untouched:
the relay only moves bytes.

The relay listens before the upstream is known (a lab picks the legacy server's ports when it starts);
connections made before `upstream` is set wait for it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Relay:
    def __init__(self, host: str = "127.0.0.1", *, rate: float = 0.0, chunk: int = 4096) -> None:
        self.rate = rate  # bytes per second from upstream to the client, per connection (0: unlimited)
        self.chunk = chunk
        self.upstream: tuple[str, int] | None = None
        self.ready = threading.Event()
        self.connections = 0
        self.bytes_down = 0
        self._sock = socket.create_server((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True)
        self._thread.start()

    def point_at(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.ready.set()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if not self.ready.wait(60) or self.upstream is None:
            client.close()
            return
        try:
            server = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            self.connections += 1
            self._conns += [client, server]
        up = threading.Thread(target=self._pump, args=(client, server, False), daemon=True)
        up.start()
        self._pump(server, client, True)
        up.join(5)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        started = time.monotonic()
        sent = 0
        try:
            while True:
                data = src.recv(self.chunk if throttled else 65536)
                if not data:
                    break
                if throttled and self.rate > 0:
                    sent += len(data)
                    due = started + sent / self.rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    else:  # idle time does not build up credit for a later burst
                        started, sent = time.monotonic(), 0
                    self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
