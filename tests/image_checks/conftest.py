"""Context for image checks, passed in by `invoke test-image` through the environment."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return dict(json.loads(Path(os.environ["EDGEBAKE_MANIFEST"]).read_text()))
