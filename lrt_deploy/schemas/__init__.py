"""JSON Schemas of the bundle contract: ``manifest.json``, ``report.json`` and lrt-bench output.

The schema files ship inside the package (standard library only here), so tools and apps in
other languages can validate a bundle against the same contract the tests check.
"""

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
    """Return one of the packaged JSON Schemas as a dict.

    Args:
        name: ``"manifest"``, ``"report"`` or ``"bench"``.

    Raises:
        KeyError: If ``name`` is not a known schema.
    """
    if name not in SCHEMA_NAMES:
        raise KeyError(f"unknown schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__name__).joinpath(SCHEMA_NAMES[name]).read_text(encoding="utf-8")
    return json.loads(text)
