"""HTTP /health (JSON) and /metrics (Prometheus text) on the standard library's server;
other paths (the unit's page, shared samples) are answered by the routes the service adds."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Snapshot = Callable[[], dict[str, Any]]
# Sent with every answer: nothing is cached or sniffed, framed or told where it came from.
SAFE_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"))


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, list[str]]
    headers: Any  # the request's header lines (an email.message.Message): .get(name)


@dataclass
class Reply:
    code: int
    kind: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Iterator[bytes] | None = None  # parts sent one by one, each within the timeout


# Answers a request, or None: not this route's path
Route = Callable[[Request], Reply | None]


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


Samples = list[tuple[dict[str, str], float | None]]


def _metric(out: list[str], name: str, kind: str, help_text: str, samples: Samples) -> None:
    out.append(f"# HELP edgebake_{name} {help_text}")
    out.append(f"# TYPE edgebake_{name} {kind}")
    for labels, value in samples:
        if value is None:
            continue
        label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        out.append(f"edgebake_{name}{{{label_text}}} {value}" if label_text
                   else f"edgebake_{name} {value}")


def prometheus_text(snap: dict[str, Any]) -> str:
    """The same figures as /health, in Prometheus exposition format."""
    out: list[str] = []
    _metric(out, "up", "gauge", "1 while the service is healthy (watchdog pings are sent).",
            [({}, 1.0 if snap["healthy"] else 0.0)])
    _source_metrics(out, snap["sources"])
    _inference_metrics(out, snap)
    _sink_metrics(out, snap)
    return "\n".join(out) + "\n"


def _source_metrics(out: list[str], sources: dict[str, Any]) -> None:
    for name, kind, help_text, key in (
            ("source_fps", "gauge", "Frames per second captured.", "fps"),
            ("source_frame_age_seconds", "gauge", "Age of the newest frame.",
             "last_frame_age_sec"),
            ("source_queue_depth", "gauge", "Frames waiting for inference.", "queue_depth"),
            ("source_frames_total", "counter", "Frames captured.", "frames"),
            ("source_dropped_total", "counter",
             "Frames replaced by newer ones before inference.", "drops"),
            ("source_corrupt_total", "counter", "Frames that could not be decoded.",
             "corrupt_frames"),
            ("source_reconnects_total", "counter", "Reconnect attempts.", "reconnects")):
        _metric(out, name, kind, help_text, [({"source": n}, s[key]) for n, s in sources.items()])
    _metric(out, "source_up", "gauge", "1 while the source delivers frames.",
            [({"source": n}, 1.0 if s["state"] == "up" else 0.0) for n, s in sources.items()])


def _inference_metrics(out: list[str], snap: dict[str, Any]) -> None:
    inf = snap["inference"]
    _metric(out, "inference_latency_seconds", "summary", "Interpreter invoke() time.",
            [({"quantile": "0.5"}, inf["p50_ms"] / 1000 if inf["p50_ms"] is not None else None),
             ({"quantile": "0.99"},
              inf["p99_ms"] / 1000 if inf["p99_ms"] is not None else None)])
    _metric(out, "results_total", "counter", "Results produced.", [({}, inf["results"])])
    _metric(out, "inference_errors_total", "counter", "Frames whose inference failed.",
            [({}, inf["errors"])])
    _metric(out, "worker_restarts_total", "counter",
            "Camera processes replaced after they exited or were killed.",
            [({}, inf.get("worker_restarts", 0))])
    model = snap["model"]
    _metric(out, "model_info", "gauge", "The loaded model.",
            [({"sha256": model["sha256"], "version": model["version"],
               "runtime": f'{model["runtime"]} {model["runtime_version"]}'}, 1.0)])


def _sink_metrics(out: list[str], snap: dict[str, Any]) -> None:
    journal = snap["journal"]
    _metric(out, "journal_records_total", "counter", "Records written to the journal.",
            [({}, journal["written"])])
    _metric(out, "journal_ok", "gauge", "1 while the journal accepts writes.",
            [({}, 0.0 if journal["error"] else 1.0)])
    _metric(out, "journal_dropped_undelivered_total", "counter",
            "Results deleted by retention before any sink delivered them.",
            [({}, journal["dropped_undelivered"])])
    _metric(out, "journal_dropped_unwritten_total", "counter",
            "Results that could not be written to the journal at all.",
            [({}, journal["dropped_unwritten"])])
    _metric(out, "data_free_ratio", "gauge", "Free share of the journal's filesystem.",
            [({}, (journal["free_percent"] or 0.0) / 100)])
    mqtt = snap.get("mqtt")
    if mqtt:
        _metric(out, "mqtt_connected", "gauge", "1 while connected to the broker.",
                [({}, 1.0 if mqtt["connected"] else 0.0)])
        _metric(out, "mqtt_published_total", "counter", "Results acknowledged by the broker.",
                [({}, mqtt["published"])])
        _metric(out, "mqtt_backlog_bytes", "gauge", "Journal bytes not yet acknowledged.",
                [({}, mqtt["backlog_bytes"])])
        _metric(out, "mqtt_sender_restarts_total", "counter",
                "Times the sender thread restarted.", [({}, mqtt["sender_restarts"])])


# Kernel send buffer of a live stream's connection: a few pictures.
STREAM_SEND_BUFFER = 128 * 1024
# A request's line and headers together; /health and /metrics need a few hundred bytes.
MAX_REQUEST_BYTES = 8192


class BoundedHTTPServer(ThreadingHTTPServer):
    """One thread per connection, but at most `limit` at once and a few per client address,
    each with a deadline for the whole request, and only from allowed networks: a LAN
    neighbour that opens connections and sends nothing, or one byte at a time, cannot use up
    the unit's threads or memory, nor keep monitoring out."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], handler: Any, limit: int,
                 allow: list[str]) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        # a browser on the unit's page opens a few at once (one of them a live stream)
        self.per_address = max(4, limit // 2)
        self.open: dict[str, int] = {}  # connections being served, by client address
        self.open_lock = threading.Lock()
        self.allow = [ipaddress.ip_network(n, strict=False) for n in allow]
        self.refused = 0
        self.snapshot: Snapshot = lambda: {"healthy": False}  # HealthServer sets these
        self.timeout_sec = 5.0
        self.routes: list[Route] = []
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.allow:
            try:
                peer = ipaddress.ip_address(client_address[0])
            except ValueError:
                return False
            if not any(peer in network for network in self.allow):
                self.refused += 1
                return False
        with self.open_lock:
            if self.open.get(client_address[0], 0) >= self.per_address or \
                    not self.slots.acquire(blocking=False):
                self.refused += 1
                return False
            self.open[client_address[0]] = self.open.get(client_address[0], 0) + 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.open_lock:
                self.open[client_address[0]] -= 1
                if not self.open[client_address[0]]:
                    del self.open[client_address[0]]
            self.slots.release()


class CappedReader:
    """A connection's reads, ending (b"") once the request has used up its bytes."""

    def __init__(self, raw: Any, limit: int) -> None:
        self.raw = raw
        self.left = limit

    def readline(self, size: int = -1) -> bytes:
        want = self.left if size < 0 else min(size, self.left)
        line: bytes = self.raw.readline(want) if want > 0 else b""
        self.left -= len(line)
        return line

    def read(self, size: int = -1) -> bytes:
        return self.readline(size)

    def close(self) -> None:
        self.raw.close()


class Handler(BaseHTTPRequestHandler):
    """One connection: GET /health, /metrics, or a path one of the server's routes takes."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        """The whole request has the server's `timeout_sec`, however slowly it trickles in,
        and so has the answer going out; the unit's own time building it (slow on a loaded
        unit) is not the client's to be cut for."""
        super().setup()
        self.connection.settimeout(self.server.timeout_sec)  # every read and write
        self.rfile = CappedReader(self.rfile, MAX_REQUEST_BYTES)  # type: ignore
        self._start_deadline()

    def _start_deadline(self) -> None:
        self.deadline = threading.Timer(self.server.timeout_sec, self._cut)
        self.deadline.daemon = True
        self.deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def parse_request(self) -> bool:
        """A request line cut off by MAX_REQUEST_BYTES, or one without a version
        (HTTP/0.9, whose answer would have no status line), gets a plain error."""
        if not super().parse_request():
            return False  # answered already
        line: bytes = getattr(self, "raw_requestline", b"")
        cut = not line.endswith(b"\n")
        if not cut and self.request_version != "HTTP/0.9":
            return True
        self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.send_error(414 if cut else 400,
                        f"request line over {MAX_REQUEST_BYTES} bytes" if cut
                        else "HTTP/1.0 or later expected")
        return False

    def do_GET(self) -> None:
        self.deadline.cancel()  # the request is in; _reply starts the answer's own
        parts = urlsplit(self.path)
        if parts.path == "/health":
            snap = self.server.snapshot()
            body = json.dumps(snap, sort_keys=True).encode()
            self._reply(Reply(200 if snap["healthy"] else 503, "application/json",
                              body))
        elif parts.path == "/metrics":
            body = prometheus_text(self.server.snapshot()).encode()
            self._reply(Reply(200, "text/plain; version=0.0.4", body))
        else:
            request = Request(parts.path, parse_qs(parts.query), self.headers)
            answer = next((reply for route in self.server.routes
                           if (reply := route(request)) is not None), None)
            self._reply(answer or Reply(404, "text/plain",
                                        b"not found: try /, /health or /metrics\n"))

    def _reply(self, reply: Reply) -> None:
        self._start_deadline()
        self.send_response(reply.code)
        self.send_header("Content-Type", reply.kind)
        if reply.stream is None:
            self.send_header("Content-Length", str(len(reply.body)))
        for name, value in (*SAFE_HEADERS, *reply.headers):
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if reply.stream is None:
            self.wfile.write(reply.body)
            return
        try:
            # a viewer's unread parts take at most this much of the unit's memory
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                       STREAM_SEND_BUFFER)
            self.deadline.cancel()
            for part in reply.stream:
                self._start_deadline()  # each part has the whole timeout to go out
                self.wfile.write(part)
                self.wfile.flush()
                self.deadline.cancel()
        except OSError:
            pass  # the viewer left, or read too slowly: the stream ends here
        finally:
            close = getattr(reply.stream, "close", None)
            if close is not None:
                close()

    def log_message(self, format: str, *args: Any) -> None:
        pass



class HealthServer:
    def __init__(self, bind: str, port: int, snapshot: Snapshot, max_connections: int = 8,
                 timeout_sec: float = 5.0, allow: list[str] | None = None) -> None:
        self.server = BoundedHTTPServer((bind, port), Handler, max_connections, allow or [])
        self.server.snapshot = snapshot
        self.server.timeout_sec = timeout_sec
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http",
                                        daemon=True)

    @property
    def routes(self) -> list[Route]:
        """More paths (the unit's page, shared samples), tried in turn."""
        return self.server.routes

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
