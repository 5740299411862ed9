"""URLs without their secrets, for everything a unit reports.

A camera's `rtsp://user:pass@host/…` or a pull URL's `?token=…` must never reach /health, the
MQTT health topic, systemd's status line or a log: each of them is readable by more people
than the unit's configuration is.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# a URL as it may stand inside an error message
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: user, password, query and fragment left out."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<url>"
    if ":" in host:
        host = f"[{host}]"
    hidden = "…" if parts.query or parts.fragment else ""
    return urlunsplit((parts.scheme, host + port, parts.path, "", "")) + hidden


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted."""
    return URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
