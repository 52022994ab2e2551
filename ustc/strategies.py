"""Importing this module registers every built-in strategy."""

from ustc import baselines, merging, pool, recycle, scoring  # noqa: F401
