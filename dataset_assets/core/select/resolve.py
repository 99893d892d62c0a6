"""What a download TARGET names: any mix of collection ids, analysis_result_ids (every series of
an analysis result, across its collections), PatientIDs, StudyInstanceUIDs,
SeriesInstanceUIDs, ``crdc_series_uuid``s (of this release or of an earlier one) and
SOPInstanceUIDs, each found in the index; and the manifest that downloads them.

* Each value's kind is looked up (``kinds_of``): a value found in no column is unresolved and
  named with what was searched; a value found in two columns (a PatientID that is also a
  collection id) is unresolved too, never guessed (``--by`` settles it).
* A ``crdc_series_uuid`` that only an earlier IDC release served (``prior_versions_index``)
  downloads that version, into the layout's directory with its last component replaced by
  ``v<max_idc_version>_<crdc_series_uuid>`` (the last release that served it). That index has no
  instance count, and its sizes are rounded to 10 kB, so the engine learns the exact file count
  and bytes from one listing of the prefix (``fill_prior_counts``), checked against the index.
* A SOPInstanceUID (``sm_instance_index``, fetched on demand) is one file: see ``instances``.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import pyarrow as pa

from dataset_assets.core.errors import EmptySelectionError, FilterError, IndexUnavailableError
from dataset_assets.core.index.source import collection_ids, release_of, sql_str
from dataset_assets.core.safety import location_problem
from dataset_assets.core.select.filters import ManifestFilters
from dataset_assets.core.select.layout import Layout
from dataset_assets.core.select.manifest import MANIFEST_COLUMNS, WHOLE_COLLECTION_KEY, build_manifest, manifest_schema
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.progress import parse_line

#: Kind -> the ``idc_index`` column it is looked up in, in the order of messages.
KIND_COLUMNS = {
    "collection": "collection_id",
    "analysis_result": "analysis_result_id",
    "patient": "PatientID",
    "study": "StudyInstanceUID",
    "series": "SeriesInstanceUID",
    "crdc_series_uuid": "crdc_series_uuid",
}
#: A SOPInstanceUID, looked up in sm_instance_index.
INSTANCE = "instance"
KINDS = (*KIND_COLUMNS, INSTANCE)
COLUMN_OF = {**KIND_COLUMNS, INSTANCE: "SOPInstanceUID"}
#: ``--by`` values: auto finds each value's kind.
BY_CHOICES = ("auto", *KINDS)
#: The layout value that puts every file of a selection in one folder.
FLAT = "flat"


@dataclass(frozen=True)
class Entry:
    """One value to resolve: its kind when known (``--by``, a CSV header, an s5cmd line), where
    it came from (``line 3``) and a problem found while reading it (a malformed line)."""

    value: str
    kind: str | None = None
    origin: str | None = None
    problem: str | None = None

    def label(self) -> str:
        shown = repr(self.value) if self.value else ""
        return f"{self.origin} {shown}".strip() if self.origin else shown


@dataclass
class Selection:
    """What a TARGET resolved to: series (a manifest for the engine), single instances, and
    the entries that could not be resolved (one text each)."""

    manifest: pa.Table | None
    instances: list[dict] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    prior: set[str] = field(default_factory=set)  # crdc_series_uuid of series from an earlier release
    release: int | None = None
    slide_studies: set[str] = field(default_factory=set)  # studies holding SM series: opened in Slim
    emptied: list[str] = field(default_factory=list)  # collections the filters left nothing of (why, each)

    @property
    def series_count(self) -> int:
        return self.manifest.num_rows if self.manifest is not None else 0


def entries_from_target(target: str, kind: str = "auto") -> list[Entry]:
    """The comma-separated values of a command-line TARGET."""
    values = list(dict.fromkeys(v.strip() for v in target.split(",") if v.strip()))
    if not values:
        raise FilterError("TARGET names nothing; give collection ids, UIDs or a manifest file")
    return [Entry(v, None if kind == "auto" else kind) for v in values]


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}


def kinds_of(con: duckdb.DuckDBPyConnection, values: list[str], instance_index: Path | None) -> dict[str, list[str]]:
    """Value -> every kind it is found as (current index, prior releases, SOP instances)."""
    found: dict[str, list[str]] = {v: [] for v in values}
    if not values:
        return found
    for kind, column in KIND_COLUMNS.items():
        rows = con.execute(
            f'SELECT DISTINCT "{column}" FROM idc_index WHERE list_contains(?, "{column}")', [values]
        ).fetchall()
        for (value,) in rows:
            found[value].append(kind)
    if "prior_versions_index" in _tables(con):
        rows = con.execute(
            "SELECT DISTINCT crdc_series_uuid FROM prior_versions_index WHERE list_contains(?, crdc_series_uuid)",
            [values],
        ).fetchall()
        for (value,) in rows:
            if "crdc_series_uuid" not in found[value]:
                found[value].append("crdc_series_uuid")
    if instance_index is not None:
        rows = con.execute(
            f"SELECT DISTINCT SOPInstanceUID FROM read_parquet({sql_str(str(instance_index))}) "
            "WHERE list_contains(?, SOPInstanceUID)",
            [values],
        ).fetchall()
        for (value,) in rows:
            found[value].append(INSTANCE)
    return found


def _searched(release: int, instance_index: Path | None, instance_hint: str) -> str:
    sop = (
        "the SOPInstanceUIDs of sm_instance_index"
        if instance_index is not None
        else f"SOPInstanceUIDs were not searched (sm_instance_index is not fetched: {instance_hint})"
    )
    return (
        f"searched the collection_id, analysis_result_id, PatientID, StudyInstanceUID, SeriesInstanceUID and "
        f"crdc_series_uuid "
        f"columns of idc_index (v{release}), the crdc_series_uuid of prior_versions_index; {sop}"
    )


#: A UUID in any case (crdc_series_uuids are lowercase in the index; users paste them upper-case).
_ANY_CASE_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
#: A DICOM UID: digits and dots.
_DICOM_UID = re.compile(r"[0-9]+(?:\.[0-9]+)+")


def _looks_like_name(value: str) -> bool:
    """Neither a UUID nor a DICOM UID: a collection id may have been meant."""
    return not (_ANY_CASE_UUID.fullmatch(value) or _DICOM_UID.fullmatch(value))


def _near_collections(con: duckdb.DuckDBPyConnection, value: str) -> list[str]:
    """Collection ids close to ``value`` (``QIN-PET-Phantom`` is near ``qin_pet_phantom``)."""
    normalized = re.sub(r"[\s-]+", "_", value.strip()).lower()
    return difflib.get_close_matches(normalized, collection_ids(con), n=3, cutoff=0.6)


def _tried(instance_index: Path | None) -> str:
    kinds = [
        "collection id",
        "analysis_result_id",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "crdc_series_uuid",
    ]
    if instance_index is not None:
        kinds.append("SOPInstanceUID")
    return f"{', '.join(kinds[:-1])} or {kinds[-1]} of this release or an earlier one"


def _unknown_text(
    con: duckdb.DuckDBPyConnection, unknown: list[Entry], release: int, instance_index: Path | None, hint: str
) -> str:
    """What was tried for values found nowhere; ``unknown collection`` only for a value that looks
    like a name (never for a UID or UUID), with the collection ids near it."""
    searched = _searched(release, instance_index, hint)
    if len(unknown) > 1:
        shown = ", ".join(e.label() for e in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        return f"{len(unknown)} values match nothing: {shown}; none is a {_tried(instance_index)} ({searched})"
    entry = unknown[0]
    text = f"{entry.label()} is not a {_tried(instance_index)} ({searched})"
    if not _looks_like_name(entry.value):
        return text
    close = _near_collections(con, entry.value)
    did_you_mean = f"; nearest collection ids: {', '.join(close)}" if close else ""
    return f"unknown collection {entry.value!r}: {text}{did_you_mean}"


def _forced_unknown_text(kind: str, unknown: list[Entry], con: duckdb.DuckDBPyConnection) -> str:
    shown = ", ".join(f"{e.value} ({e.origin})" if e.origin else e.value for e in unknown[:10]) + (
        ", ..." if len(unknown) > 10 else ""
    )
    if kind == "collection" and len(unknown) == 1:
        close = _near_collections(con, unknown[0].value)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown collection {unknown[0].value!r} (list them with `dataset idc collections`){hint}"
    where = "sm_instance_index" if kind == INSTANCE else "the index"
    if kind == "crdc_series_uuid":
        where = "the index (current release or prior_versions_index)"
    return f"{len(unknown)} {kind} value(s) not in {where}: {shown}"


def _lowercased_if_found(entry: Entry, lowered: dict[str, str], found: dict[str, list[str]]) -> Entry:
    """``entry`` with its UUID lowercased when only the lowercase form is found (as its kind)."""
    lower = lowered.get(entry.value)
    if lower is None:
        return entry
    wanted = (lambda kinds: entry.kind in kinds) if entry.kind is not None else bool
    if wanted(found.get(entry.value, [])) or not wanted(found.get(lower, [])):
        return entry
    return replace(entry, value=lower)


def resolve(
    con: duckdb.DuckDBPyConnection,
    entries: list[Entry],
    filters: ManifestFilters | None = None,
    *,
    layout: str,
    root_length: int = 0,
    max_path: int | None = None,
    long_paths: str = "hash",
    instance_index: Path | None = None,
    instance_hint: str = "",
) -> Selection:
    """Resolve ``entries`` and build the manifest of their series (current and prior releases)
    and the list of their single instances. Unresolvable entries are returned, not raised
    (``require_resolved`` raises); an entry forced to ``instance`` without a fetched
    ``sm_instance_index`` raises ``IndexUnavailableError`` saying how to fetch it."""
    filters = filters or ManifestFilters()
    release = release_of(con)
    if instance_index is None and any(e.kind == INSTANCE for e in entries):
        raise IndexUnavailableError(f"SOPInstanceUIDs need sm_instance_index, which is not fetched; {instance_hint}")
    unresolved = [f"{e.label()}: {e.problem}" for e in entries if e.problem]
    entries = [e for e in entries if not e.problem]
    values = list(dict.fromkeys(e.value for e in entries))
    # UUIDs match in any case: an exact match wins, else the lowercase form (the index's).
    lowered = {v: v.lower() for v in values if _ANY_CASE_UUID.fullmatch(v) and v != v.lower()}
    found = kinds_of(con, list(dict.fromkeys([*values, *lowered.values()])), instance_index)
    entries = [_lowercased_if_found(e, lowered, found) for e in entries]
    chosen: dict[str, set[str]] = {k: set() for k in KINDS}
    unknown_auto: list[Entry] = []
    unknown_forced: dict[str, list[Entry]] = {}
    for entry in entries:
        kinds = found.get(entry.value, [])
        if entry.kind is not None:
            if entry.kind in kinds:
                chosen[entry.kind].add(entry.value)
            else:
                unknown_forced.setdefault(entry.kind, []).append(entry)
        elif not kinds:
            unknown_auto.append(entry)
        elif len(kinds) > 1:
            columns = " and ".join(COLUMN_OF[k] for k in kinds)
            unresolved.append(
                f"{entry.label()} is both a {columns}; name its kind with --by ({', '.join(kinds)})"
                + (" or a CSV header" if entry.origin else "")
            )
        else:
            chosen[kinds[0]].add(entry.value)
    for kind, missing in unknown_forced.items():
        unresolved.append(_forced_unknown_text(kind, missing, con))
    if unknown_auto:
        unresolved.append(_unknown_text(con, unknown_auto, release, instance_index, instance_hint))

    index_columns = [r[0] for r in con.execute("DESCRIBE idc_index").fetchall()]
    flat = layout == FLAT
    parsed = Layout.parse(FLAT_STAGING if flat else layout, index_columns)
    render = {"layout": parsed.template, "root_length": root_length, "max_path": max_path, "long_paths": long_paths}

    whole = chosen["collection"]
    by_collection: dict[str, set[str]] = {}
    for kind in ("analysis_result", "patient", "study", "series", "crdc_series_uuid"):
        if not chosen[kind]:
            continue
        column = KIND_COLUMNS[kind]
        rows = con.execute(
            f'SELECT collection_id, SeriesInstanceUID FROM idc_index WHERE list_contains(?, "{column}")',
            [sorted(chosen[kind])],
        ).fetchall()
        for collection_id, series_uid in rows:
            if collection_id not in whole:
                by_collection.setdefault(collection_id, set()).add(series_uid)
    base = filters.as_dict()
    tables = []
    emptied: list[str] = []  # what the filters left of each collection that they emptied
    for collection_id in sorted(whole | set(by_collection)):
        narrowed = filters
        if collection_id not in whole:
            narrowed = ManifestFilters.from_mapping({**base, "series_uids": sorted(by_collection[collection_id])})
        try:
            tables.append(build_manifest(con, collection_id, narrowed, **render))  # type: ignore[arg-type]
        except EmptySelectionError as exc:
            # One collection of a selection may have nothing the filters keep; the others go on.
            emptied.append(str(exc) if collection_id in whole else f"{collection_id}: none of its selected series")
    current_uuids = set()
    for table in tables:
        current_uuids.update(table.column("crdc_series_uuid").to_pylist())
    prior_uuids = sorted(u for u in chosen["crdc_series_uuid"] if u not in current_uuids)
    prior_uuids = [
        u
        for u in prior_uuids
        if not con.execute("SELECT 1 FROM idc_index WHERE crdc_series_uuid = ? LIMIT 1", [u]).fetchall()
    ]
    prior = _prior_table(con, prior_uuids, parsed) if prior_uuids else None
    instances = _instances(con, instance_index, sorted(chosen[INSTANCE]), parsed, render) if chosen[INSTANCE] else []
    if tables or prior is not None:
        schema = _manifest_schema(con)
        parts = [t.select(schema.names).cast(schema) for t in tables]
        if prior is not None:
            parts.append(prior.cast(schema))
        manifest = pa.concat_tables(parts)
        dirs = parsed.finish(
            manifest.column("target_dir"), root_length=root_length, max_path=max_path, long_paths=long_paths
        )
        manifest = manifest.set_column(manifest.num_columns - 1, "target_dir", dirs)
        is_whole = len(whole) == 1 and not by_collection and prior is None and not any(base.values())
        manifest = manifest.replace_schema_metadata({WHOLE_COLLECTION_KEY: b"true" if is_whole else b"false"})
        series = set(manifest.column("SeriesInstanceUID").to_pylist())
        instances = [i for i in instances if i["SeriesInstanceUID"] not in series]  # the whole series comes anyway
        from dataset_assets.core.index.viewer import slide_studies

        slides = slide_studies(con, manifest)
    else:
        manifest, slides = None, set()
        if emptied and not instances:
            if len(emptied) == 1 and whole:
                raise EmptySelectionError(emptied[0])
            shown = "; ".join(emptied[:3]) + ("; ..." if len(emptied) > 3 else "")
            raise EmptySelectionError(f"the filters {base} leave no series of the selection ({shown})")
    return Selection(manifest, instances, unresolved, set(prior_uuids), release, slides, emptied)


#: Flat layouts are staged per series below this directory (see ``flat``).
FLAT_STAGING = ".series/%crdc_series_uuid/"


def require_resolved(selection: Selection) -> Selection:
    """``FilterError`` (one line) when anything was left unresolved, or nothing at all resolved."""
    if selection.unresolved:
        more = len(selection.unresolved)
        raise FilterError(
            ("; ".join(selection.unresolved[:5]) + (f"; and {more - 5} more" if more > 5 else ""))
            + (". Nothing was downloaded" if more else "")
        )
    if selection.manifest is None and not selection.instances:
        raise FilterError("the selection names no series")
    return selection


def _manifest_schema(con: duckdb.DuckDBPyConnection) -> pa.Schema:
    """The types of every manifest (whatever types the index stored its values as)."""
    del con
    return manifest_schema()


def prior_manifest(con: duckdb.DuckDBPyConnection, uuids: list[str], parsed: Layout) -> pa.Table:
    """Manifest rows (``manifest_schema``) of the series only an earlier release served, each in
    ``v<max_idc_version>_<crdc_series_uuid>/`` (not yet ``finish``-ed); their ``instanceCount``
    and ``series_bytes`` are NULL until ``fill_prior_counts`` lists them."""
    return _prior_table(con, uuids, parsed).cast(_manifest_schema(con))


def _prior_table(con: duckdb.DuckDBPyConnection, uuids: list[str], parsed: Layout) -> pa.Table:
    """Manifest rows of series only an earlier release served; ``instanceCount`` and
    ``series_bytes`` are NULL until ``fill_prior_counts`` lists them."""
    prior_columns = {r[0] for r in con.execute("DESCRIBE prior_versions_index").fetchall()}
    # Layout columns under names of their own: a layout may name a manifest column (%crdc_series_uuid).
    layout_columns = []
    for i, column in enumerate(parsed.columns):
        value = f'"{column}"' if column in prior_columns else "CAST(NULL AS VARCHAR)"
        layout_columns.append(f'{value} AS "_layout_{i}"')
    table = con.sql(
        "SELECT collection_id, PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, "
        "CAST(NULL AS VARCHAR) AS BodyPartExamined, crdc_series_uuid, aws_bucket, series_aws_url, "
        "CAST(NULL AS BIGINT) AS instanceCount, series_size_MB, CAST(NULL AS BIGINT) AS series_bytes, "
        "CAST(NULL AS VARCHAR) AS license_short_name, CAST(NULL AS VARCHAR) AS source_DOI, "
        f"max_idc_version AS series_revised_idc_version, {', '.join(layout_columns)} "
        "FROM (SELECT * FROM prior_versions_index WHERE list_contains(?, crdc_series_uuid) "
        "QUALIFY row_number() OVER (PARTITION BY crdc_series_uuid ORDER BY max_idc_version DESC) = 1) "
        "ORDER BY crdc_series_uuid",
        params=[uuids],
    ).arrow()
    table = table if isinstance(table, pa.Table) else table.read_all()
    # The columns of the layout, with their own names (a layout column may repeat a manifest one).
    layout_table = pa.table({c: table.column(len(MANIFEST_COLUMNS) + i) for i, c in enumerate(parsed.columns)})
    dirs = parsed.render_unchecked(layout_table).to_pylist()
    versioned = []
    for directory, uuid, version in zip(
        dirs,
        table.column("crdc_series_uuid").to_pylist(),
        table.column("series_revised_idc_version").to_pylist(),
        strict=True,
    ):
        parent = directory.rstrip("/").rpartition("/")[0]
        versioned.append(f"{parent}/v{version}_{uuid}/" if parent else f"v{version}_{uuid}/")
    return table.select(list(range(len(MANIFEST_COLUMNS)))).append_column("target_dir", pa.array(versioned))


def _instances(
    con: duckdb.DuckDBPyConnection, instance_index: Path | None, uids: list[str], parsed: Layout, render: dict
) -> list[dict]:
    """One dict per SOP instance: its object, size and series, and the series' directory."""
    assert instance_index is not None
    rows = con.execute(
        "SELECT s.SOPInstanceUID, s.crdc_instance_uuid, s.instance_size, i.collection_id, i.PatientID, "
        "i.StudyInstanceUID, i.SeriesInstanceUID, i.Modality, i.crdc_series_uuid, i.aws_bucket, i.series_aws_url, "
        "i.source_DOI, i.license_short_name "
        f"FROM read_parquet({sql_str(str(instance_index))}) s JOIN idc_index i USING (SeriesInstanceUID) "
        "WHERE list_contains(?, s.SOPInstanceUID) ORDER BY s.SOPInstanceUID",
        [uids],
    )
    names = [d[0] for d in rows.description]
    instances = [dict(zip(names, r, strict=True)) for r in rows.fetchall()]
    missing = sorted(set(uids) - {i["SOPInstanceUID"] for i in instances})
    if missing:
        raise FilterError(
            f"SOPInstanceUID(s) {', '.join(missing[:5])} are in sm_instance_index but their series is not in idc_index "
            "(the two indices are of different releases?)"
        )
    dirs: dict[str, str] = {}
    by_collection: dict[str, set[str]] = {}
    for instance in instances:
        by_collection.setdefault(instance["collection_id"], set()).add(instance["SeriesInstanceUID"])
    for collection_id, series in by_collection.items():
        table = build_manifest(con, collection_id, ManifestFilters(series_uids=tuple(sorted(series))), **render)
        dirs.update(
            zip(table.column("SeriesInstanceUID").to_pylist(), table.column("target_dir").to_pylist(), strict=True)
        )
    for instance in instances:
        instance["target_dir"] = dirs[instance["SeriesInstanceUID"]]
    return instances


PRIOR_SIZE_TOLERANCE_MB = 0.005 + 1e-9  # prior_versions_index rounds series_size_MB to 2 decimals


def fill_prior_counts(
    manifest: pa.Table, prior: set[str], options: s5cmd.S5cmdOptions, allowed_buckets: tuple[str, ...]
) -> tuple[pa.Table, list[str]]:
    """Set ``instanceCount`` and ``series_bytes`` of the prior-release rows from one listing of
    each prefix (their exact values, which the engine verifies file by file); the listed total
    must round to the index's ``series_size_MB``. Returns the table without the rows that could
    not be listed, and one problem per such row."""
    rows = manifest.to_pylist()
    todo = [r for r in rows if r["crdc_series_uuid"] in prior]
    problems: list[str] = []
    listed: dict[str, dict[str, int]] = {}
    urls: dict[str, dict] = {}
    for row in todo:
        problem = location_problem(row, allowed_buckets)
        if problem:
            problems.append(f"prior-release series {row['crdc_series_uuid']}: {problem}")
            continue
        urls[options.source_url(row["series_aws_url"], row["aws_bucket"])] = row
    if urls:
        listed = list_prefixes(list(urls), options)
    for url, row in urls.items():
        objects = listed.get(url, {})
        total = sum(objects.values())
        where = f"prior-release series {row['crdc_series_uuid']} (v{row['series_revised_idc_version']})"
        if not objects:
            problems.append(f"{where}: no object under {url[:-1]} on the server")
        elif abs(total / 1e6 - row["series_size_MB"]) > PRIOR_SIZE_TOLERANCE_MB:
            problems.append(
                f"{where}: the server's {len(objects)} objects hold {total:,} bytes but prior_versions_index says "
                f"{row['series_size_MB']} MB; the bucket and the index disagree"
            )
        else:
            row["instanceCount"], row["series_bytes"] = len(objects), total
    kept = [r for r in rows if r["crdc_series_uuid"] not in prior or r["instanceCount"] is not None]
    table = pa.Table.from_pylist(kept, schema=manifest.schema)
    return table, problems


def list_prefixes(urls: list[str], options: s5cmd.S5cmdOptions) -> dict[str, dict[str, int]]:
    """``s3://bucket/uuid/*`` -> {object name: size}, with one ``s5cmd run`` of ``ls`` lines.
    The URLs are checked by the caller (allow-listed bucket, UUID): nothing in them needs quoting."""
    prefixes = {u[:-1]: u for u in urls}
    listed: dict[str, dict[str, int]] = {u: {} for u in urls}

    def on_stdout(line: str) -> None:
        record = parse_line(line) or {}
        key, size = record.get("key"), record.get("size")
        if isinstance(key, str) and isinstance(size, int):
            prefix, _, name = key.rpartition("/")
            url = prefixes.get(prefix + "/")
            if url is not None and name:
                listed[url][name] = size

    fd, name = tempfile.mkstemp(prefix="dataset-ls-", suffix=".s5cmd")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(f'ls "{u}"\n' for u in urls)
        s5cmd.run_commands(options, name, on_stdout=on_stdout, on_stderr=lambda _line: None)
    finally:
        os.unlink(name)
    return listed
