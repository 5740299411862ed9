"""Helpers for tests that run the project's tools as a user does: paths, invoke tasks, and a
bundle server."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke"]


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """An invoke task as a user runs it, from the repository root, output captured."""
    return subprocess.run([*INVOKE, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def partition_table(image: Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out)["partitiontable"])


def broker_args(broker: Any) -> list[str]:
    """A TLS LocalBroker's address and login as the broker tasks take them."""
    assert broker.tls is not None
    return ["--broker", "127.0.0.1", "--port", str(broker.port), "--username",
            broker.tls.username, "--password", broker.tls.password, "--ca-file",
            str(broker.tls.ca_file)]


class BundleServer:
    """A real HTTP server with one bundle behind an ETag, counting what it served."""

    def __init__(self, bundle: Path, etag: str = '"v2"') -> None:
        self.bundle, self.etag = bundle, etag
        self.served = self.not_modified = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("If-None-Match") == outer.etag:
                    outer.not_modified += 1
                    self.send_response(304)
                    self.end_headers()
                    return
                data = outer.bundle.read_bytes()
                outer.served += 1
                self.send_response(200)
                self.send_header("ETag", outer.etag)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str = "current.ebundle") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/fleet/{name}"

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
