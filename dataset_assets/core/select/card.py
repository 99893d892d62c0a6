"""A dataset card beside every verified download: what was downloaded, from which IDC release,
chosen how, under which licences, and how to cite it, in words (``DATASET-<name>.md``) and for
machines (``dataset-<name>.json``), in the download root.

The card is a function of the manifest, the selection that made it and the verified download:
it is written again, whole and atomically, by every verified run. It sits in the download root,
outside every series tree (the stray-file check walks series trees only), named by the
selection's own name (a collection id, ``cohort-<name>``, a selection's digest), so cards of
selections sharing a root never collide.
"""

from __future__ import annotations

import errno
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.fs import new_file
from dataset_assets.core.safety import require_name
from dataset_assets.core.select.filters import is_noncommercial
from dataset_assets.core.select.licences import licence_counts, restricted

#: Schema metadata of a manifest naming the selection that made it (filters, layout, release).
SELECTION_KEY = b"dataset_assets.selection"
CARD_VERSION = 1


def selection_metadata(table: pa.Table, selection: dict) -> pa.Table:
    """``table`` carrying ``selection`` (JSON) in its schema metadata, for the card of its download."""
    metadata = dict(table.schema.metadata or {})
    metadata[SELECTION_KEY] = json.dumps(selection, sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def selection_of(table: pa.Table) -> dict:
    """The selection a manifest was made by (empty for one written before cards existed)."""
    raw = (table.schema.metadata or {}).get(SELECTION_KEY)
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dataset_card(
    manifest: pa.Table,
    *,
    name: str,
    kind: str,
    release: int | None,
    selection: dict,
    citations: list[dict],
    tool_version: str,
    s5cmd_version: str | None,
    root: Path,
    verified_at: datetime | None = None,
) -> dict:
    """The card of a verified download of ``manifest`` (see the module)."""
    licences = licence_counts(manifest)
    held = restricted(licences)
    files = pc.sum(manifest.column("instanceCount")).as_py() or 0
    size = pc.sum(manifest.column("series_bytes")).as_py() or 0
    return {
        "card_version": CARD_VERSION,
        "name": name,
        "kind": kind,
        "idc_release": f"v{release}" if release is not None else None,
        "selection": selection,
        "series": manifest.num_rows,
        "files": files,
        "bytes": size,
        "size": human_bytes(size),
        "collections": sorted(set(manifest.column("collection_id").to_pylist())),
        "modalities": sorted({m for m in manifest.column("Modality").to_pylist() if m}),
        "patients": pc.count_distinct(manifest.column("PatientID")).as_py(),
        "studies": pc.count_distinct(manifest.column("StudyInstanceUID")).as_py(),
        "licenses": licences,
        "restricted_licenses": held,
        "noncommercial_series": sum(n for lic, n in licences.items() if is_noncommercial(lic)),
        "citations": [
            {k: c.get(k) for k in ("doi", "doi_url", "citation", "license", "series", "collections")} for c in citations
        ],
        "download_root": str(root),
        "tool": {"name": "dataset_assets", "version": tool_version, "s5cmd": s5cmd_version},
        "verified_at": (verified_at or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
    }


def _md(value: object) -> str:
    """A value as text in a Markdown table cell: one line, no markup of its own (a path or an
    index value may hold `|`, backticks, HTML or line breaks)."""
    text = " ".join(str(value).split())
    for char, escaped in (
        ("\\", "\\\\"),
        ("|", "\\|"),
        ("`", "\\`"),
        ("*", "\\*"),
        ("[", "\\["),
        ("]", "\\]"),
    ):
        text = text.replace(char, escaped)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def card_markdown(card: dict) -> str:
    """The card in words: a page a person reads before using the data."""
    lines = [
        f"# {_md(card['name'])}",
        "",
        f"IDC data downloaded and verified file by file with dataset_assets {card['tool']['version']}"
        f" (s5cmd {card['tool']['s5cmd'] or 'unknown'}) on {card['verified_at']}.",
        "",
        "| | |",
        "| --- | --- |",
        f"| IDC release | {card['idc_release'] or 'unknown'} |",
        f"| what | {card['kind']} {_md(card['name'])} |",
        f"| collections | {_md(', '.join(card['collections']))} |",
        f"| series | {card['series']:,} |",
        f"| files | {card['files']:,} |",
        f"| size | {card['size']} ({card['bytes']:,} bytes) |",
        f"| patients / studies | {card['patients']:,} / {card['studies']:,} |",
        f"| modalities | {_md(', '.join(card['modalities']))} |",
        f"| where | {_md(card['download_root'])} |",
        "",
        "## How it was selected",
        "",
        "```json",
        json.dumps(card["selection"], indent=2, sort_keys=True),
        "```",
        "",
        "## Licences",
        "",
        "| licence | series |",
        "| --- | --- |",
        *(f"| {_md(lic)} | {n:,} |" for lic, n in card["licenses"].items()),
        "",
    ]
    if card["restricted_licenses"]:
        total = sum(card["restricted_licenses"].values())
        lines += [
            f"**{total:,} series are under licences that restrict their use** "
            f"({_md(', '.join(card['restricted_licenses']))}); "
            f"{card['noncommercial_series']:,} of them may not be used commercially. Read the licences before use.",
            "",
        ]
    lines += ["## How to cite", ""]
    lines += [f"- {_md(c['citation'] or c['doi_url'])}" for c in card["citations"]]
    lines += ["", f"Machine-readable twin: `dataset-{card['name']}.json` beside this file.", ""]
    return "\n".join(lines)


def card_paths(root: Path, name: str) -> tuple[Path, Path]:
    """``(DATASET-<name>.md, dataset-<name>.json)`` in ``root``."""
    require_name(name, "card name")
    return root / f"DATASET-{name}.md", root / f"dataset-{name}.json"


def write_card(root: Path, card: dict) -> tuple[Path, Path]:
    """Write both files of ``card`` into ``root``, each atomically (never through a link planted there)."""
    markdown, twin = card_paths(root, card["name"])
    for path in (markdown, twin):  # both or neither: a folder in the way of one stops both
        if os.path.isdir(path) and not os.path.islink(path):
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way of the dataset card", str(path))
    with new_file(twin, "w", encoding="utf-8") as out:
        json.dump(card, out, indent=2, sort_keys=True)
        out.write("\n")
    with new_file(markdown, "w", encoding="utf-8") as out:
        out.write(card_markdown(card))
    return markdown, twin
