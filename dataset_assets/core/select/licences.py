"""The licences of a selection: which series are under which licence, and which of those ask
more than attribution (see ``filters.is_restricted``). Read from a manifest's
``license_short_name`` column; no index, no network."""

from __future__ import annotations

import pyarrow as pa

from dataset_assets.core.select.filters import is_noncommercial, is_restricted


def licence_counts(manifest: pa.Table) -> dict[str, int]:
    """Licence -> series of ``manifest`` under it (``"unknown"`` for a series without one), most first."""
    import pyarrow.compute as pc

    # value_counts, a plain kernel: group_by would start Acero's engine (tens of MB for a few rows)
    counted = pc.value_counts(manifest.column("license_short_name")).to_pylist()
    totals: dict[str, int] = {}
    for item in counted:
        name = item["values"] or "unknown"
        totals[name] = totals.get(name, 0) + item["counts"]
    return dict(sorted(totals.items(), key=lambda p: (-p[1], p[0])))


def restricted(counts: dict[str, int]) -> dict[str, int]:
    """The licences of ``counts`` that ask more than attribution, with their series."""
    return {name: n for name, n in counts.items() if is_restricted(None if name == "unknown" else name)}


def restriction_text(counts: dict[str, int]) -> str:
    """One line: how many series are under restricted licences, and which."""
    held = restricted(counts)
    if not held:
        return f"all {sum(counts.values()):,} series are under attribution-only licences ({', '.join(counts)})"
    total = sum(held.values())
    shown = ", ".join(
        f"{name}: {n:,} series" + (" (no commercial use)" if is_noncommercial(name) else "") for name, n in held.items()
    )
    return (
        f"{total:,} of {sum(counts.values()):,} series are under licences that restrict their use ({shown}); "
        "read them before use, or select with exclude_noncommercial / licenses"
    )
