"""The unit's page token: what lets a technician see the pictures of a site.

It comes from the seed (`http.token`), else the service makes one at its first start and
keeps it in `http.token_file` (mode 0600, the service's). `sudo edgebake-update status`
prints it over SSH; it never goes to the broker.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from .atomic import write_atomic
from .config import HttpSettings

TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")


def kept_page_token(settings: HttpSettings) -> str:
    """The seed's token, else the one kept on the unit ("" when none is kept yet)."""
    if settings.token:
        return settings.token
    try:
        kept = Path(settings.token_file).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    return kept if TOKEN.fullmatch(kept) else ""


def page_token(settings: HttpSettings) -> str:
    """The page's token, made and kept now if there is none (OSError: it cannot be kept)."""
    kept = kept_page_token(settings)
    if kept:
        return kept
    made = secrets.token_urlsafe(24)
    path = Path(settings.token_file)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, (made + "\n").encode(), 0o600)
    return made
