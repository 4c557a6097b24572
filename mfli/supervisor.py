"""Temporary alias: :func:`free_port` lives in :mod:`mfli.lifecycle` (until every caller moved)."""

from mfli.lifecycle import free_port  # noqa: F401
