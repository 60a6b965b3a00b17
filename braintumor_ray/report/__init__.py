"""Self-contained static HTML review reports of scoring outputs, training runs and searches.

    write_scoring_report(dst, series=...)            # OUTPUT/_report.html, after every scoring run
    write_training_report(metrics, run, examples)    # RUN/report.html
    write_search_report(summary, root, leaderboard=..., columns=..., histories=...)  # SEARCH/report.html

One HTML file each, with its CSS, JS, charts (inline SVG) and images (``data:`` URIs) inside:
it opens from local disk or straight from S3, with no server and nothing to install. Tables sort
and filter in the page. Only numpy, pandas, pyarrow and the core package are used: the stages
call this, never the reverse.
"""

from ._page import REPORT_FILE, data_table, line_chart, page, risk_coverage, write_html
from ._scoring import (
    MAX_CASES,
    MAX_TABLE_ROWS,
    SCORING_REPORT,
    read_predictions,
    review_order,
    scoring_report_html,
    scoring_report_location,
    write_scoring_report,
)
from ._training import Example, search_report_html, training_report_html, write_search_report, write_training_report

__all__ = [
    "Example",
    "MAX_CASES",
    "MAX_TABLE_ROWS",
    "REPORT_FILE",
    "SCORING_REPORT",
    "data_table",
    "line_chart",
    "page",
    "read_predictions",
    "review_order",
    "risk_coverage",
    "scoring_report_html",
    "scoring_report_location",
    "search_report_html",
    "training_report_html",
    "write_html",
    "write_scoring_report",
    "write_search_report",
    "write_training_report",
]
