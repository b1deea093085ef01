"""JSON Schemas of the bundle contract (``manifest.json``, ``report.json``, lrt-bench output),
shipped so that apps in any language can validate a bundle."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["SCHEMA_NAMES", "load_schema"]

#: Schema name -> file in this package.
SCHEMA_NAMES = {
    "manifest": "manifest.schema.json",
    "report": "report.schema.json",
    "bench": "bench.schema.json",
}


def load_schema(name: str) -> dict[str, Any]:
    """The packaged JSON Schema ``name`` (a key of :data:`SCHEMA_NAMES`) as a dict."""
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__name__).joinpath(SCHEMA_NAMES[name]).read_text(encoding="utf-8")
    return json.loads(text)
