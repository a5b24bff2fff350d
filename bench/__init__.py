"""Benchmarks that print ratios against peers; not part of the tests."""
from __future__ import annotations

import json
from typing import Optional


def write_json(path: Optional[str], payload: dict) -> None:
    """Each benchmark's --json FILE: {"results": {name: value}, ...details}; nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
