"""Electorate agent: takes part in leader elections and reports them to the dashboard.

This package must never import Django.
"""

__version__ = "0.1.0"
