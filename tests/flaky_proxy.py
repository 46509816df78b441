"""A fault-injecting HTTP proxy for tests: put it between an S3 client and a local S3 server.

It forwards every request (method, path and query, headers, body) to one upstream on 127.0.0.1
and returns the upstream's answer, except that it can answer instead, at seeded random places or
by a fixed schedule, with one of S3's transient failures:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body, before the upstream sees the request;
- ``drop``: the connection is closed without an answer, before the upstream sees the request;
- ``drop_after``: the upstream applies the request, then the connection is closed without an
  answer (the response is lost: the case that makes a retried write run twice upstream).

Every decision is counted, so a test can check that faults really happened. The proxy only ever
listens on and connects to 127.0.0.1, and stops with :meth:`FlakyProxy.stop` (or ``with``).
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULT_KINDS = ("slowdown", "drop", "drop_after")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message></Error>")
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business; Expect is answered here (the
# handler sends "100 Continue" itself) because http.client cannot wait for it upstream.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                         "transfer-encoding", "expect"})


@dataclass
class FaultPlan:
    """Which requests fail, and how. Mutable: a test may change it between runs."""

    rate: float = 0.0
    """Share of requests answered with a fault: one in each run of round(1 / rate) requests, at a
    random (seeded) place in it. Stratified rather than independent draws, so the number of faults
    is certain (a test can rely on them) while where they land is not."""
    kinds: tuple[str, ...] = FAULT_KINDS
    """Fault kinds, taken in turn (round robin), so a handful of faults already covers every kind."""
    every: int = 0
    """If > 0, fault deterministically every ``every``-th request (1-based) instead of by ``rate``."""
    seed: int = 0
    """Seed of the draws (thread scheduling still decides which request gets which draw)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not self.kinds or set(self.kinds) - set(FAULT_KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}, got {self.kinds}")
        if self.every < 0:
            raise ValueError("every must be >= 0")


class FlakyProxy:
    """``FlakyProxy(upstream, FaultPlan(rate=0.1))``: a proxy on ``proxy.url`` in a background thread."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None, timeout_s: float = 60.0):
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or parsed.hostname != "127.0.0.1" or not parsed.port:
            raise ValueError(f"the upstream must be http://127.0.0.1:PORT, got {upstream!r}")
        self.upstream_port = parsed.port
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.set_plan(plan or FaultPlan())
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-proxy", daemon=True)
        self._thread.start()

    def set_plan(self, plan: FaultPlan) -> None:
        """Switch to ``plan`` and reset the counts."""
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)
            self._seq = 0
            self._fault_at = 0
            self.counts: Counter[str] = Counter()  # "forwarded" plus one key per fault kind
            self.faulted_requests: list[str] = []  # "METHOD path?query: kind", in order

    def decide(self, request_line: str) -> str | None:
        """The fault for the next request, or None to forward it cleanly."""
        with self._lock:
            self._seq += 1
            plan = self.plan
            if plan.every:
                faulty = self._seq % plan.every == 0
            elif plan.rate > 0:
                block = max(1, round(1 / plan.rate))
                if (self._seq - 1) % block == 0:  # a new run of `block` requests: place its fault
                    self._fault_at = self._seq + self._rng.randrange(block)
                faulty = self._seq == self._fault_at
            else:
                faulty = False
            kind = plan.kinds[self.faults % len(plan.kinds)] if faulty else None
            self.counts[kind or "forwarded"] += 1
            if kind:
                self.faulted_requests.append(f"{request_line}: {kind}")
            return kind

    @property
    def faults(self) -> int:
        return sum(self.counts[k] for k in FAULT_KINDS)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> "FlakyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as S3 clients expect
        timeout = 300  # seconds an idle kept-alive connection may hold its thread

        def log_message(self, format: str, *args) -> None:  # quiet: pytest shows failures, not traffic
            pass

        def _read_body(self) -> tuple[bytes, bool]:
            """The request body, and whether it came chunked (then it is forwarded chunked again)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return b"".join(self._read_chunks()), True
            return self.rfile.read(int(self.headers.get("Content-Length") or 0)), False

        def _read_chunks(self) -> Iterator[bytes]:
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()  # CRLF after the chunk

        def _drop(self) -> None:
            """Close without a word: the client sees the connection end with no response."""
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _handle(self) -> None:
            body, chunked = self._read_body()  # always read whole, so a kept-alive connection stays in sync
            fault = proxy.decide(f"{self.command} {self.path}")
            if fault == "drop":
                return self._drop()
            if fault == "slowdown":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOWDOWN_BODY)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            if chunked:
                headers["Transfer-Encoding"] = "chunked"
            upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=proxy.timeout_s)
            try:
                upstream.request(self.command, self.path, body=[body] if chunked else body, headers=headers,
                                 encode_chunked=chunked)
                resp = upstream.getresponse()
                data = resp.read()
                status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
            finally:
                upstream.close()
            if fault == "drop_after":
                return self._drop()
            self.send_response(status, reason)
            for k, v in resp_headers:
                # send_response wrote its own Date and Server; a HEAD keeps the upstream's Content-Length
                # (the object's size), any other answer gets the length of the body read here.
                if k.lower() in HOP_HEADERS or k.lower() in ("date", "server") or \
                        (k.lower() == "content-length" and self.command != "HEAD"):
                    continue
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
