"""`invoke fleet-status --html F` and `--serve PORT`: the fleet on one self-contained page.

Every unit seen on the broker, grouped by its update group: online or offline (its last
will), healthy or its problems in plain words, the model and system versions, how long ago
its last result was, the stage of a rollout (`--rollout STATE`) and a link to the unit's own
page. Everything a unit reported is escaped; the page has no script and loads nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .fleet import UnitView, age_text
from .rollout.state import RolloutState

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }
header { background: #20343f; color: #fff; padding: .6em 1em; }
h1 { font-size: 1.15em; margin: 0; } h2 { font-size: 1em; margin: 1em 1em .3em; }
table { border-collapse: collapse; margin: 0 1em; background: #fff; min-width: 60%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
.offline { color: #888; } .bad { color: #a11; font-weight: 600; } .ok { color: #175; }
ul { margin: 0; padding-left: 1.1em; } .note { margin: .4em 1em; color: #555; }
"""
CSP = ("default-src 'none'; style-src 'sha256-"
       + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
       + "'; img-src data:; base-uri 'none'; form-action 'none'")
# a written page carries CSP in a <meta>, where frame-ancestors does not apply
SERVED_CSP = CSP + "; frame-ancestors 'none'"
COLUMNS = ("unit", "link", "health", "model", "system", "last result", "rollout", "page")


def render(units: dict[str, UnitView], rollout: RolloutState | None = None,
           refresh_sec: int = 0, now: float | None = None) -> str:
    """The page; with `refresh_sec` it reloads itself that often (the live one)."""
    now = time.time() if now is None else now
    stages = {u.device: u for u in rollout.units} if rollout is not None else {}
    groups: dict[str, list[UnitView]] = {}
    for name in sorted(units):
        groups.setdefault(units[name].group or "(no group)", []).append(units[name])
    online = sum(u.online == "online" for u in units.values())
    healthy = sum(bool(u.healthy) and u.online == "online" for u in units.values())
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<link rel="icon" href="data:,">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">']
    if refresh_sec:
        out.append(f'<meta http-equiv="refresh" content="{refresh_sec}">')
    out += ["<title>edgebake fleet</title>", f"<style>{STYLE}</style></head><body>",
            f"<header><h1>edgebake fleet: {len(units)} unit(s), {online} online, "
            f"{healthy} healthy</h1>"
            f"<div>as of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}</div>"
            "</header>"]
    if rollout is not None:
        out.append(f'<p class="note" id="rollout">rollout of {_e(rollout.version)}: '
                   f"{_e(rollout.phase)}; {rollout.count('confirmed')} confirmed, "
                   f"{rollout.count('failed')} failed (at most {rollout.max_failures}), "
                   f"{rollout.count('ordered', 'trial')} on trial</p>")
    if not units:
        out.append('<p class="note">no unit has reported to this broker yet</p>')
    for group, members in groups.items():
        out.append(f"<h2>group {_e(group)}</h2><table><tr>"
                   + "".join(f"<th>{c}</th>" for c in COLUMNS) + "</tr>")
        out += [_row(u, stages.get(u.device), rollout, now) for u in members]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _row(unit: UnitView, stage: Any, rollout: RolloutState | None, now: float) -> str:
    off = unit.online != "online"
    if unit.healthy is None:
        health = "?"
    elif unit.healthy:
        health = '<span class="ok">healthy</span>'
    else:
        problems = unit.problems or [unit.status]
        health = '<span class="bad">NOT HEALTHY</span><ul>' + "".join(
            f"<li>{_e(p)}</li>" for p in problems) + "</ul>"
    if off and unit.healthy is not None:
        health = "last seen " + health
    last = "never" if unit.last_result_ts is None else f"{age_text(now - unit.last_result_ts)} ago"
    trial = " (on trial)" if unit.trial else ""
    step = f"stage {stage.stage + 1}/{len(rollout.ends)}: {_e(stage.outcome)}" \
        if stage is not None and rollout is not None else "-"
    page = f'<a href="{_e(unit.page_url)}" rel="noreferrer">open</a>' if unit.page_url else "-"
    cells = (_e(unit.device), f'<span class="{"offline" if off else "ok"}">'
             f"{_e(unit.online)}</span>", health, _e(unit.model or "?") + trial,
             _e(unit.os_version or "?"), last, step, page)
    return f'<tr data-unit="{_e(unit.device)}"{" class=offline" if off else ""}>' + "".join(
        f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def serve(port: int, bind: str, page: Callable[[], str], ready: Callable[[int], None],
          stop: threading.Event) -> None:
    """Serve the live page at / until `stop` is set; `ready` gets the port it listens on."""
    class Handler(BaseHTTPRequestHandler):
        timeout = 10

        def do_GET(self) -> None:
            if self.path.split("?")[0] not in ("/", "/index.html"):
                self._send(404, "text/plain; charset=utf-8", b"not found: the fleet is at /\n")
                return
            self._send(200, "text/html; charset=utf-8", page().encode())

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            for name, value in (("Content-Type", kind), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store"),
                                ("X-Content-Type-Options", "nosniff"),
                                ("Content-Security-Policy", SERVED_CSP)):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fleet-page", daemon=True)
    thread.start()
    ready(server.server_address[1])
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
