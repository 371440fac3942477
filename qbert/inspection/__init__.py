"""Looking inside models and runs: activation outliers, weight distributions, accuracy against size.

The numbers come from :mod:`qbert.inspection.outliers` and :mod:`qbert.inspection.weights` (torch and
numpy only); :mod:`qbert.inspection.plots` draws them with matplotlib (the ``viz`` extra), imported only
when a figure is written.
"""

from __future__ import annotations

from typing import Any


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    """Rows as CSV text (numbers as Python prints them), for the CSV files next to the figures."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
