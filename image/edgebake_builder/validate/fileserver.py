"""A fleet's update server for `test-image`: plain HTTP serving one folder, on 127.0.0.1
(the unit reaches it through QEMU's user network). Bundles a check puts in the folder are
what its MQTT orders point to."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Any


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class FileServer:
    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        handler = functools.partial(QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="file-server",
                                       daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def origin(self, host: str) -> str:
        """scheme://host:port as a client at `host` sees this server."""
        return f"http://{host}:{self.port}"

    def start(self) -> FileServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
