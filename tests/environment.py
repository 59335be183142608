"""Loaded first (``-p tests.environment`` in pyproject), before pytest-django reads the
settings: the suite talks plain HTTP on loopback to a production-mode database, so no HTTPS
redirect and no secure-only cookies."""

import os

os.environ.setdefault("ELECTORATE_HTTPS", "0")
