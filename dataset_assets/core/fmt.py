"""Formatting for people: sizes, rates, durations, markdown tables."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


def _is_na(value: object) -> bool:
    """pandas' NA and NaT (only when pandas is already loaded: it is never imported for this)."""
    import sys

    pandas = sys.modules.get("pandas")
    return (
        pandas is not None
        and value is not None
        and not isinstance(value, (int, float, str))
        and bool(pandas.isna(value))
    )


def human_bytes(n: float | int | None) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units, as IDC reports sizes)."""
    if n is None or (isinstance(n, float) and math.isnan(n)) or _is_na(n):
        return ""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    """``3725`` -> ``'1h02m05s'``; ``None`` -> ``'?'``."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def markdown_table(table: pd.DataFrame | pa.Table, max_rows: int = 200) -> str:
    """A GitHub-flavoured markdown table of a DataFrame or an Arrow table (first ``max_rows`` rows)."""

    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)) or _is_na(v):
            return ""
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    if hasattr(table, "column_names"):  # Arrow: no pandas (0.2 s to import) for a preview
        columns, count = list(table.column_names), table.num_rows
        values = [tuple(row.values()) for row in table.slice(0, max_rows).to_pylist()]
    else:
        columns, count = list(table.columns), len(table)
        values = list(table.head(max_rows).itertuples(index=False))
    head = "| " + " | ".join(map(str, columns)) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in values]
    more = [f"\n_{count - max_rows:,} more rows not shown_"] if count > max_rows else []
    return "\n".join([head, rule, *rows, *more])


#: What an error the system reports without a path means for a download (errno -> explanation).
_PATHLESS = {
    27: "a file reached the largest size allowed: a process limit such as `ulimit -f`, or the file system's",
    28: "the disk is full",
    122: "the disk quota is used up",
}


def os_error_text(exc: OSError) -> str:
    """``'<path>: <reason>'`` for a file-system error, one line, no traceback; a write the system
    reports without a path (a file-size limit, a full disk) says what that means instead."""
    if exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    reason = str(exc.strerror or exc)
    meaning = _PATHLESS.get(exc.errno or 0)
    return f"{reason} while writing ({meaning})" if meaning else reason


def redact_url(url: str) -> str:
    """``https://user:pw@h/f?sig=…#x`` -> ``https://h/f?…``: no credentials, query or fragment in
    what is printed, logged or stored. The one rule for a URL; ``scrub_text`` applies it to text.
    User info is everything up to the last ``@`` before the query (a password holding a raw ``/``
    included), so a mistyped URL shows less, never a secret."""
    from urllib.parse import urlsplit, urlunsplit

    url = _USERINFO.sub("", str(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "…" if parts.query else "", ""))


#: ``user:password@`` after ``scheme://``, up to the URL's last ``@`` before its query or fragment
#: (greedy: a ``/`` in a password does not end it); a query string right after a URL or a path.
_USERINFO = re.compile(r"(?<=://)[^\s?#'\"<>]*@")
_QUERY = re.compile(r"(?<=[\w/.~%:-])\?[^\s'\"<>)\]]+")


def scrub_text(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL removed and every query string (``?...``
    right after a URL or path) replaced by ``?…``: the one scrubber for messages, logs and
    metadata that may quote a URL (exceptions from requests and urllib3 do)."""
    return _QUERY.sub("?…", _USERINFO.sub("", text))
