"""Citations and licences of a selection, from the data shipped with idc-index-data only.

Every series of ``idc_index`` carries the DOI of its source (``source_DOI``: the collection, or
an analysis result such as AI segmentations) and its licence (``license_short_name``). Each DOI is
looked up in ``collections_index.sources`` (title, licence with URL and long name, an APA
citation) and in ``analysis_results_index`` when the index folder has it. Series of an earlier
release (``prior_versions_index`` has no DOI) are cited by their collection's original data.

No request is made. The shipped citation is APA; BibTeX is built from the same fields (title,
DOI, URL, year, publisher, authors when the APA author list parses cleanly) and says where the
complete entry is (doi.org, which needs the network). A DOI with no shipped record says so.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa

from dataset_assets.core.index.source import sql_str

FORMATS = ("apa", "bibtex", "json")

#: The paper that describes IDC itself, cited with any IDC data (as idc-index always adds it);
#: kept here so that every format has it offline.
IDC_PAPER_DOI = "10.1148/rg.230180"
IDC_PAPER = {
    "doi": IDC_PAPER_DOI,
    "doi_url": f"https://doi.org/{IDC_PAPER_DOI}",
    "title": "National Cancer Institute Imaging Data Commons: Toward Transparency, Reproducibility, "
    "and Scalability in Imaging Artificial Intelligence",
    "source_type": "idc_publication",
    "source_id": "radiographics_2023",
    "license": None,
    "license_name": None,
    "license_url": None,
    "citation": "Fedorov, A., Longabaugh, W. J. R., Pot, D., Clunie, D. A., Pieper, S. D., Gibbs, D. L., "
    "Bridge, C., Herrmann, M. D., Homeyer, A., Lewis, R., Aerts, H. J. W. L., Krishnaswamy, D., "
    "Thiriveedhi, V. K., Ciausu, C., Schacherer, D. P., Bontempi, D., Pihl, T., Wagner, U., Farahani, K., "
    "Kim, E., & Kikinis, R. (2023). National Cancer Institute Imaging Data Commons: Toward Transparency, "
    "Reproducibility, and Scalability in Imaging Artificial Intelligence. RadioGraphics, 43(12), e230180. "
    "https://doi.org/10.1148/rg.230180",
    "collections": [],
    "series": 0,
    "note": None,
}


def _clean(text: str | None) -> str | None:
    """The shipped citations are HTML (``&amp;``, ``<i>``) wrapped at 100 columns: plain text, one line."""
    if text is None:
        return None
    return " ".join(re.sub(r"<[^>]+>", "", html.unescape(text)).split())


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def _record(title, url, short, long, license_url, citation, kind, source_id) -> dict:
    """One source as the citation formats read it (columns in the order both queries select them)."""
    return {
        "title": title,
        "url": url,
        "license": short,
        "license_name": long,
        "license_url": license_url,
        "citation": _clean(citation),
        "source_type": kind,
        "source_id": source_id,
    }


def _shipped_sources(con: duckdb.DuckDBPyConnection, analysis_results: Path | None) -> dict[str, dict]:
    """lower(DOI) -> record from collections_index (and analysis_results_index)."""
    records: dict[str, dict] = {}
    if analysis_results is not None and analysis_results.is_file():
        rows = con.execute(
            "SELECT source_DOI, analysis_result_title, source_url, license_short_name, license_long_name, "
            f"license_url, citation, analysis_result_id FROM read_parquet({sql_str(str(analysis_results))})"
        ).fetchall()
        for doi, *fields, result_id in rows:
            if doi:
                records[doi.lower()] = _record(*fields, "analysis_result", result_id)
    if "collections_index" in _tables(con):
        rows = con.execute(
            "SELECT s.source_doi, s.source_title, s.source_url, s.license.license_short_name, "
            "s.license.license_long_name, s.license.license_url, s.citation, s.source_type, s.source_id "
            "FROM (SELECT unnest(sources) AS s FROM collections_index)"
        ).fetchall()
        for doi, *fields in rows:
            if doi:
                records.setdefault(doi.lower(), _record(*fields))
    return records


def _original_dois(con: duckdb.DuckDBPyConnection, collections: list[str]) -> dict[str, list[str]]:
    """collection_id -> DOIs of its original data (for series without a DOI of their own)."""
    if not collections or "collections_index" not in _tables(con):
        return {}
    rows = con.execute(
        "SELECT collection_id, list_transform(list_filter(sources, lambda s: s.source_type = 'original_data'), "
        "lambda s: s.source_doi) FROM collections_index WHERE list_contains(?, collection_id)",
        [collections],
    ).fetchall()
    return {c: [d for d in (dois or []) if d] for c, dois in rows}


def citations(
    con: duckdb.DuckDBPyConnection,
    manifest: pa.Table | None,
    extra_series: list[dict] | None = None,
    analysis_results: Path | None = None,
) -> list[dict]:
    """One record per source DOI of the selection (series of ``manifest`` plus ``extra_series``
    dicts with collection_id/source_DOI/license_short_name), most series first."""
    keys = ["collection_id", "source_DOI", "license_short_name"]
    rows = []
    if manifest is not None:  # grouped first: nlst's 592,600 series are a few rows here, not 592,600 dicts
        import pyarrow.compute as pc

        from dataset_assets.core.arrow_build import scalar

        # value_counts of the (collection, DOI, licence) triples joined by a separator no value holds
        # (index values hold no control characters): a plain kernel, not Acero's group_by
        parts = [pc.fill_null(manifest.column(k).cast("string"), scalar("")) for k in keys]  # no pandas probe
        joined = pc.binary_join_element_wise(*parts, scalar("\x1f"))
        rows = [
            {**dict(zip(keys, (v or None for v in item["values"].split("\x1f")), strict=True)), "n": item["counts"]}
            for item in pc.value_counts(joined).to_pylist()
        ]
    rows += [{**{k: r.get(k) for k in keys}, "n": 1} for r in (extra_series or [])]
    fallback = _original_dois(con, sorted({r["collection_id"] for r in rows if not r["source_DOI"]}))
    shipped = _shipped_sources(con, analysis_results)
    by_doi: dict[str, dict] = {}
    for row in rows:
        dois = [row["source_DOI"]] if row["source_DOI"] else fallback.get(row["collection_id"], [])
        for doi in dois:
            key = doi.lower()
            entry = by_doi.setdefault(key, {"doi": doi, "series": 0, "collections": set(), "series_licenses": set()})
            entry["series"] += row["n"]
            entry["collections"].add(row["collection_id"])
            if row["license_short_name"]:
                entry["series_licenses"].add(row["license_short_name"])
    records = []
    for key, entry in by_doi.items():
        record = shipped.get(key)
        doi = entry["doi"]
        records.append(
            {
                "doi": doi,
                "doi_url": f"https://doi.org/{doi}",
                "title": record["title"] if record else None,
                "source_type": record["source_type"] if record else None,
                "source_id": record["source_id"] if record else None,
                "license": (record or {}).get("license") or ", ".join(sorted(entry["series_licenses"])) or None,
                "license_name": record["license_name"] if record else None,
                "license_url": record["license_url"] if record else None,
                "citation": record["citation"] if record else None,
                "collections": sorted(entry["collections"]),
                "series": entry["series"],
                "note": None
                if record and record["citation"]
                else f"no citation shipped with the index for this DOI; the full reference is at https://doi.org/{doi} "
                "(needs the network)",
            }
        )
    records.sort(key=lambda r: (-r["series"], r["doi"]))
    if records and all(r["doi"].lower() != IDC_PAPER_DOI for r in records):
        records.append({**IDC_PAPER, "series": sum(e["series"] for e in by_doi.values())})
    return records


_YEAR = re.compile(r"(.*?)\s*\((\d{4})\)\.?\s*(.*)", re.DOTALL)
_AUTHOR = re.compile(r"[^,&()]+, (?:[A-Z][a-z]?\.(?:[ -]?[A-Z][a-z]?\.)*)")


def _authors(apa_head: str) -> str | None:
    """``Beichel, R., Ulrich, E. J., & Buatti, J. M.`` -> ``Beichel, R. and Ulrich, E. J. and Buatti, J. M.``;
    None when any name does not parse (the APA text stays the reference)."""
    names = [n.strip() for n in re.split(r"(?<=\.),\s*(?:&\s*)?|\s+&\s+", apa_head.strip()) if n.strip()]
    if not names or not all(_AUTHOR.fullmatch(n) for n in names):
        return None
    return " and ".join(names)


def _bibtex_key(record: dict) -> str:
    base = record.get("source_id") or record["doi"]
    return "idc_" + re.sub(r"[^A-Za-z0-9]+", "_", str(base)).strip("_").lower()


def _bib(value: str) -> str:
    return value.replace("{", "\\{").replace("}", "\\}")


def bibtex(record: dict) -> str:
    if record["source_type"] == "idc_publication":
        return _paper_bibtex(record)
    fields = {"title": record["title"], "doi": record["doi"], "url": record["doi_url"]}
    citation = record["citation"] or ""
    match = _YEAR.fullmatch(citation)
    if match:
        authors = _authors(match.group(1))
        if authors:
            fields["author"] = authors
        fields["year"] = match.group(2)
        publisher = re.search(r"\[Data set\]\.\s*([^.]+(?:\.[^ .][^.]*)*)\.\s*https?://", citation)
        if publisher:
            fields["publisher"] = publisher.group(1).strip()
    licence = record["license"]
    if licence:
        fields["note"] = f"Licence: {licence}" + (f" ({record['license_url']})" if record["license_url"] else "")
    body = ",\n".join(f"  {k} = {{{_bib(v)}}}" for k, v in fields.items() if v)
    comment = (
        f"% complete entry (all fields as the publisher registered them): "
        f'curl -LH "Accept: application/x-bibtex" {record["doi_url"]} (needs the network)'
    )
    if not record["citation"]:
        comment = f"% {record['note']}"
    return f"{comment}\n@misc{{{_bibtex_key(record)},\n{body}\n}}"


def _paper_bibtex(record: dict) -> str:
    match = _YEAR.fullmatch(record["citation"])
    fields = {
        "author": _authors(match.group(1)) if match else None,
        "title": record["title"],
        "journal": "RadioGraphics",
        "volume": "43",
        "number": "12",
        "pages": "e230180",
        "year": "2023",
        "doi": record["doi"],
        "url": record["doi_url"],
    }
    body = ",\n".join(f"  {k} = {{{_bib(v)}}}" for k, v in fields.items() if v)
    return f"% the Imaging Data Commons itself: cite it with any IDC data\n@article{{{_bibtex_key(record)},\n{body}\n}}"


def apa(record: dict) -> str:
    if record["source_type"] == "idc_publication":
        return f"{record['citation']}\n  The Imaging Data Commons itself: cite it with any IDC data"
    text = record["citation"] or f"{record['title'] or 'Untitled source'}. https://doi.org/{record['doi']}"
    licence = record["license"] or "licence not given in the index"
    if record["license_name"] or record["license_url"]:
        licence += f" ({', '.join(x for x in (record['license_name'], record['license_url']) if x)})"
    lines = [
        text,
        f"  Licence: {licence}",
        f"  Used by {record['series']:,} series of {', '.join(record['collections'])}",
    ]
    if not record["citation"]:
        lines.append(f"  Note: {record['note']}")
    return "\n".join(lines)


def render(records: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "bibtex":
        return "\n\n".join(bibtex(r) for r in records)
    return "\n\n".join(apa(r) for r in records)


def license_summary(records: list[dict]) -> str:
    """``CC BY 3.0 (2 sources), CC BY 4.0 (1 source)``."""
    counts: dict[str, int] = {}
    for record in records:
        if record["source_type"] == "idc_publication":
            continue  # not a data source: it has no licence of its own
        counts[record["license"] or "unknown"] = counts.get(record["license"] or "unknown", 0) + 1
    return ", ".join(f"{k} ({n} source{'s' if n > 1 else ''})" for k, n in sorted(counts.items()))
