"""Durations as written in agent configs: ``500ms``, ``10s``, ``1m``, ``1h``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: object) -> float:
    """Return seconds. Plain numbers are seconds; strings need a unit."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '10s', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration like '500ms', '10s' or '1m', got {value!r}")


#: A pydantic field type for config durations: ``ttl: Duration = 10.0``.
Duration = Annotated[float, BeforeValidator(parse_duration)]
