"""Temporary alias of :mod:`mfli.orchestration.report` until every caller moved."""

from mfli.orchestration.report import eval_report, snapshot_stats, write_report  # noqa: F401
