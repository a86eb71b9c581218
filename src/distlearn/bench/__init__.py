"""``distlearn bench``: every strategy on the same work, one command, one table, one plot.

:mod:`.suites` defines the work, :mod:`.harness` runs each strategy in its own bounded processes and reads
the results back from the metrics files, :mod:`.report` turns them into the raw JSON, the Markdown table,
the plots and the projection; :mod:`.cli` is the command.
"""

from distlearn.bench.suites import SUITES, Entry, Suite, get_suite

__all__ = ["SUITES", "Entry", "Suite", "get_suite"]
