"""A fault-injecting TCP proxy for an HTTP object store, on 127.0.0.1 (tests/test_flaky_s3.py).

Clients reach the store (the moto server) through the proxy, which relays bytes both ways and
follows the HTTP/1.1 request framing (``Content-Length``, chunked bodies) so that it sees every
request, including the second and later ones of a kept-alive connection. Per request, from one
seeded ``random.Random``, it either passes the request through or injects one fault:

* ``reset_request``: the connection is reset (TCP RST) as soon as the request head has arrived,
  before anything reaches the store;
* ``reset_response``: the request reaches the store (a PUT is carried out), then the connection is
  reset after the first bytes of the answer -- the client cannot tell whether it happened;
* ``slow_down``: the proxy answers ``503 SlowDown`` itself, as S3 does when throttling, and closes;
* ``delay``: the request is held 50-300 ms, then passed through.

Bounded: at most ``max_faults`` faults in all (delays excepted) and never more than
``max_consecutive`` faulted requests in a row, so that a client with a few retries always gets
through and a run cannot be starved by bad luck.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter

FAULTS = ("reset_request", "reset_response", "slow_down", "delay")

SLOW_DOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of an orderly FIN.

    SHUT_RD first: it wakes a thread blocked reading this socket (the fd stays referenced, and
    the RST unsent, until that read returns) without sending anything to the peer.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class _Closed(Exception):
    pass


class FaultProxy:
    """``FaultProxy(upstream_port, seed=..., rates=...)``; ``.start()``, ``.url``, ``.counts``, ``.stop()``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        seed: int = 0,
        rates: dict[str, float] | None = None,
        max_faults: int = 60,
        max_consecutive: int = 2,
    ):
        self.upstream = upstream
        self.rates = dict(rates or {"reset_request": 0.06, "reset_response": 0.06, "slow_down": 0.08, "delay": 0.1})
        assert set(self.rates) <= set(FAULTS), self.rates
        self.random = random.Random(seed)
        self.max_faults, self.max_consecutive = max_faults, max_consecutive
        self.counts: Counter = Counter()
        self._in_a_row = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: set[socket.socket] = set()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                sock.close()

    # ------------------------------------------------------------------ decisions
    def _decide(self) -> tuple[str, float]:
        """(fault or "pass", seconds to hold the request)."""
        with self._lock:
            self.counts["requests"] += 1
            draw = self.random.random()
            faulted = sum(self.counts[f] for f in FAULTS if f != "delay")
            if faulted >= self.max_faults or self._in_a_row >= self.max_consecutive:
                self._in_a_row = 0
                return "pass", 0.0
            edge = 0.0
            for fault in FAULTS:
                edge += self.rates.get(fault, 0.0)
                if draw < edge:
                    self.counts[fault] += 1
                    self._in_a_row = 0 if fault == "delay" else self._in_a_row + 1
                    return fault, self.random.uniform(0.05, 0.3) if fault == "delay" else 0.0
            self._in_a_row = 0
            return "pass", 0.0

    # ------------------------------------------------------------------ relaying
    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=60)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._sockets.update((client, upstream))
        state = {"cut_response": False}
        back = threading.Thread(target=self._relay_responses, args=(upstream, client, state), daemon=True)
        back.start()
        try:
            self._relay_requests(client, upstream, state)
        except (_Closed, OSError):
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._sockets.difference_update((client, upstream))

    def _relay_responses(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if state["cut_response"]:
                    client.sendall(data[:12])  # part of the status line, then the line goes dead
                    _reset(client)
                    upstream.close()
                    return
                client.sendall(data)
        except OSError:
            pass
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _relay_requests(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        reader = _Reader(client)
        while True:
            head = reader.until(b"\r\n\r\n", allow_eof=True)
            if head is None:
                return
            fault, hold_s = self._decide()
            if fault == "reset_request":
                _reset(client)
                raise _Closed()
            if fault == "slow_down":
                client.sendall(SLOW_DOWN % (len(SLOW_DOWN_BODY), SLOW_DOWN_BODY))
                client.close()  # Connection: close, so the unread body cannot be mistaken for a request
                raise _Closed()
            time.sleep(hold_s)
            state["cut_response"] = fault == "reset_response"
            upstream.sendall(head)
            headers = _headers(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._relay_chunked(reader, upstream)
            else:
                remaining = int(headers.get("content-length", "0") or 0)
                while remaining:
                    data = reader.take(remaining)
                    upstream.sendall(data)
                    remaining -= len(data)

    @staticmethod
    def _relay_chunked(reader: _Reader, upstream: socket.socket) -> None:
        while True:
            size_line = reader.until(b"\r\n")
            upstream.sendall(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailer lines (aws-chunked checksums), then the empty line
                    line = reader.until(b"\r\n")
                    upstream.sendall(line)
                    if line == b"\r\n":
                        return
            remaining = size + 2  # the chunk and its CRLF
            while remaining:
                data = reader.take(remaining)
                upstream.sendall(data)
                remaining -= len(data)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if ":" in line)}


class _Reader:
    """Buffered reads from a socket: up to a delimiter, or some bytes."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def until(self, delimiter: bytes, allow_eof: bool = False) -> bytes | None:
        while (index := self.buffer.find(delimiter)) < 0:
            if not self._fill():
                if allow_eof and not self.buffer:
                    return None
                raise _Closed()
        end = index + len(delimiter)
        found, self.buffer = self.buffer[:end], self.buffer[end:]
        return found

    def take(self, limit: int) -> bytes:
        if not self.buffer and not self._fill():
            raise _Closed()
        found, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return found
