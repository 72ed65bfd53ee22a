"""Output formatting for the CLI: kubectl-style tables, JSON and YAML."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], upper: bool = True) -> str:
    """Columns left-aligned and separated by three spaces, headers in capitals, as kubectl prints."""
    head = [str(h).upper() if upper else str(h) for h in headers]
    cells = [head, *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        line = "   ".join(c.ljust(widths[i]) for i, c in enumerate(r))
        lines.append(line.rstrip())
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)


def to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False)
