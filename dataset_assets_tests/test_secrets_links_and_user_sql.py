"""Issue 17, third round of trust: secrets, planted links, validators, unbounded bodies, user SQL
that could reconfigure DuckDB, and the query command's output. Real parts: the CLI as a process,
the real index, DuckDB, a loopback HTTP server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

from dataset_assets import settings
from dataset_assets.core import safety
from dataset_assets.core.errors import DownloadError
from dataset_assets.core.fs import new_file
from dataset_assets.core.http.bundles import Bundle, download_bundle
from dataset_assets.core.index.query import TABLE_MAX_WIDTH, TABLE_WIDTH_ROWS, _write_table
from dataset_assets.core.select.manifest import write_manifest
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets.core.transfer.state import SeriesRecord, journal_path, load_state, save_state
from dataset_assets_tests.support.httpserver import FileServer
from dataset_assets_tests.test_indices_cohorts import VERSION, parquet_bytes, table_for

BIN = Path(sys.executable).parent
SECRETS = ("s3cr3tpw", "SECRETTOKEN")


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dataset"), "idc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


# -- 1. secrets in IDC_INDEX_BASE_URL ------------------------------------------------------------


@pytest.fixture
def secret_server(idc_fixture, tmp_path, monkeypatch):
    """On-demand indices under /good/ of a server whose base URL carries a password and a token."""
    series = [r["SeriesInstanceUID"] for r in idc_fixture.rows]
    with FileServer(max_lifetime_s=300) as server:
        server.files[f"/good/{VERSION}/sm_index.parquet"] = parquet_bytes(table_for("sm_index", 6, series))
        base = server.url("/good?token=SECRETTOKEN").replace("http://", "http://alice:s3cr3tpw@")
        monkeypatch.setenv("IDC_INDEX_BASE_URL", base)
        monkeypatch.setenv("IDC_EXTRA_INDEX_DIR", str(tmp_path / "indices"))
        monkeypatch.setenv("IDC_INDEX_DIR", str(idc_fixture.index_dir))
        yield server


def test_credentials_in_the_base_url_are_never_printed_and_the_path_goes_before_the_query(secret_server):
    done = cli("fetch", "sm_index")
    assert done.returncode == 0, done.stderr
    assert "fetching sm_index from http://127.0.0.1" in done.stderr
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr
    # the token stays a query string, after the path (not a path appended to the query)
    assert (f"/good/{VERSION}/sm_index.parquet?token=SECRETTOKEN") in [p for p, _ in secret_server.requests]
    assert any(h.get("Authorization", "").startswith("Basic ") for _, h in secret_server.requests)
    secret_server.files.clear()  # a failure quotes the URL too
    failed = cli("fetch", "sm_index", "--force")
    assert failed.returncode == 3 and "404" in failed.stderr
    for secret in SECRETS:
        assert secret not in failed.stdout + failed.stderr


def test_credentials_never_reach_dagster_logs_or_metadata(secret_server, idc_fixture, tmp_path):
    from dataset_assets.defs.catalog.extra_index_assets import idc_extra_index
    from dataset_assets.lib.resources import IdcResource

    resources = {
        "idc": IdcResource(index_dir=str(idc_fixture.index_dir)),
        "duckdb": DuckDBResource(database=str(tmp_path / "idc.duckdb")),
    }
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        good = dg.materialize([idc_extra_index], partition_key="sm_index", resources=resources, instance=instance)
        assert good.success
        source_url = good.asset_materializations_for_node("idc_extra_index")[0].metadata["source_url"].value
        assert source_url == secret_server.url(f"/good/{VERSION}/sm_index.parquet?…")
        secret_server.files.clear()
        (tmp_path / "indices" / VERSION / "sm_index.parquet").unlink()
        bad = dg.materialize(
            [idc_extra_index], partition_key="sm_index", resources=resources, instance=instance, raise_on_error=False
        )
        assert not bad.success
        stored = []
        for run in instance.get_runs():
            for entry in instance.all_logs(run.run_id):
                stored.append(repr(entry))  # the message, the event and its metadata, as stored
        text = "\n".join(stored)
        assert "fetching sm_index from http://127.0.0.1" in text and "404" in text
        for secret in SECRETS:
            assert secret not in text
        # and nothing in the instance's files on disk holds them either
        for path in Path(tmp_path / "home").rglob("*"):
            if path.is_file():
                for secret in SECRETS:
                    assert secret.encode() not in path.read_bytes(), path


# -- 2. create, never follow ---------------------------------------------------------------------


def test_query_output_never_writes_through_a_planted_link(idc_fixture, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    work = tmp_path / "work"
    work.mkdir()
    # every name the old code could use, and more: a link at each predictable temporary name
    for pid in range(1, 200):
        os.symlink(victim, work / f".res.csv.{pid}.tmp")
    os.symlink(victim, work / ".res.csv.tmp")
    done = cli("query", "SELECT 42 AS answer", "--format", "csv", "--output", "res.csv", cwd=work,
               env={"IDC_INDEX_DIR": str(idc_fixture.index_dir)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    result = work / "res.csv"
    assert not result.is_symlink() and result.read_text().splitlines() == ["answer", "42"]
    assert not [p.name for p in work.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_a_link_at_the_final_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name, write in (
        ("m.parquet", lambda p: write_manifest(pa.table({"a": [1]}), p)),
        ("s.parquet", lambda p: save_state(p, {"a/": SeriesRecord("1.2", "0" * 8 + "-0000-0000-0000-" + "0" * 12)})),
    ):
        path = tmp_path / name
        os.symlink(victim, path)
        write(path)
        assert victim.read_text() == "precious\n"
        assert not path.is_symlink() and pq.read_table(path).num_rows == 1


def test_new_file_uses_an_unguessable_name_and_leaves_nothing_when_it_fails(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), new_file(target, "w") as handle:
        handle.write("half")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []
    with new_file(target, "w") as handle:
        handle.write("whole")
    assert target.read_text() == "whole" and oct(target.stat().st_mode & 0o777) == "0o644"


# -- 3. validators match the whole string --------------------------------------------------------

UUID = "0b1e8f3c-4d5a-4c6b-9e7f-8a9b0c1d2e3f"
TAILS = ("\n", "\r", "\0", "\u2028", "\r\n")


@pytest.mark.parametrize("tail", TAILS)
def test_every_validator_refuses_a_trailing_line_break_or_nul(tail):
    assert safety.is_uuid(UUID) and not safety.is_uuid(UUID + tail)
    assert safety.name_problem("qin", "collection_id") is None
    assert safety.name_problem("qin" + tail, "collection_id")
    assert safety.object_name_problem("evil.dcm") is None
    assert safety.object_name_problem("evil.dcm" + tail)
    assert safety.bucket_problem("idc-open-data" + tail, safety.IDC_BUCKETS)
    assert safety.target_dir_problem("a/b" + tail + "/")
    assert safety.endpoint_problem("http://127.0.0.1:9000" + tail)
    row = {
        "SeriesInstanceUID": "1.2",
        "aws_bucket": "idc-open-data",
        "crdc_series_uuid": UUID + tail,
        "series_aws_url": f"s3://idc-open-data/{UUID + tail}/*",
        "target_dir": "a/",
        "instanceCount": 1,
        "series_bytes": 10,
    }
    assert safety.series_problem(row, safety.IDC_BUCKETS)
    from dataset_assets.core.select.portal_manifest import bucket_of
    from dataset_assets.core.transfer.disk import TEMP_SUFFIX

    assert TEMP_SUFFIX.fullmatch("x.dcm123") and not TEMP_SUFFIX.fullmatch("x.dcm123" + tail)
    assert bucket_of(f"s3://idc-open-data/{UUID}/*") == "idc-open-data"


# -- 4. a body with no announced size is bounded -------------------------------------------------


def test_an_endless_body_without_content_length_stops_at_the_cap_and_keeps_nothing(
    file_server, session, tmp_path, monkeypatch
):
    monkeypatch.setenv("DATASET_HTTP_MAX_UNSIZED_BYTES", str(5_000_000))
    file_server.files["/x.parquet"] = b"small"
    file_server.endless_next(1)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as caught:
        download_bundle(
            Bundle(name="x", url=file_server.url("/x.parquet")), dest, session=session, limits=settings.http_limits()
        )
    message = str(caught.value)
    assert "without announcing a size" in message and "DATASET_HTTP_MAX_UNSIZED_BYTES" in message
    assert "\n" not in message
    assert list(dest.iterdir()) == []  # nothing kept
    assert file_server.stats["bytes_sent"] < 200_000_000  # stopped soon after the cap


def test_a_filling_disk_stops_an_unsized_body_as_it_arrives(file_server, session, tmp_path, monkeypatch):
    import shutil

    from dataset_assets.core.http import bundles as http_bundles

    monkeypatch.setattr(http_bundles, "FREE_SPACE_EVERY_BYTES", 1 << 20)
    real = shutil.disk_usage
    calls = []

    def filling(path):  # the disk is real; only the free figure shrinks as the bytes arrive
        calls.append(path)
        usage = real(path)
        return usage._replace(free=1_000_000 if len(calls) > 2 else usage.free)

    monkeypatch.setattr(http_bundles.shutil, "disk_usage", filling)
    file_server.files["/y.bin"] = b"y"
    file_server.endless_next(1)
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="left free in .* stopped and the partial file was deleted"):
        download_bundle(Bundle(name="y", url=file_server.url("/y.bin")), dest, session=session)
    assert list(dest.iterdir()) == []


def test_the_cap_setting_is_checked(file_server, session, tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET_HTTP_MAX_UNSIZED_BYTES", "lots")
    file_server.files["/z"] = b"z"
    file_server.unsized_next(1, 1.0)
    with pytest.raises(DownloadError, match="DATASET_HTTP_MAX_UNSIZED_BYTES 'lots' is not a number of bytes"):
        download_bundle(
            Bundle(name="z", url=file_server.url("/z")), tmp_path, session=session, limits=settings.http_limits()
        )


# -- 5. user SQL cannot reconfigure DuckDB -------------------------------------------------------


def test_query_sql_cannot_install_extensions_reconfigure_or_touch_files(idc_fixture, tmp_path):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    with FileServer(max_lifetime_s=60) as server:
        attempts = [
            "INSTALL httpfs",
            f"INSTALL httpfs FROM '{server.url('')}'",
            "LOAD httpfs",
            f"SET custom_extension_repository='{server.url('')}'; SET autoinstall_known_extensions=true; "
            f"SELECT * FROM read_json('{server.url('/x.json')}')",
            "SET lock_configuration=false",
            "SET enable_external_access=true",
            f"COPY (SELECT 'pwned') TO '{tmp_path / 'out.csv'}'",
            f"ATTACH '{tmp_path / 'x.db'}'",
            "SELECT * FROM read_csv('/etc/hostname')",
        ]
        for sql in attempts:
            done = cli("query", sql, env=env)
            assert done.returncode == 2, (sql, done.stdout, done.stderr)
            assert done.stderr.startswith(("Error: query failed", "Error: query refused"))
            assert len(done.stderr.strip().splitlines()) == 1
            if sql.startswith(("INSTALL", "LOAD")):  # named as written, not as DuckDB files it
                assert f"this is 1 ({sql.split()[0]})" in done.stderr, done.stderr
        assert server.requests == []
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "x.db").exists()
    fine = cli("query", "SELECT count(*) AS n FROM idc_index", "--format", "csv", env=env)
    assert fine.returncode == 0 and fine.stdout.splitlines()[1] == str(len(idc_fixture.rows))


# -- 8-11, 13, 16. the query command's output and messages ---------------------------------------


def test_table_never_cuts_a_uid_and_marks_any_cut(idc_fixture):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    uid = "1.3.6.1.4.1.14519.5.2.1.7695.4164." + "1234567890" * 3
    assert len(uid) == 64
    done = cli("query", f"SELECT '{uid}' AS uid, repeat('x', 200) AS long", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert uid in lines[2]
    assert ("x" * (TABLE_MAX_WIDTH - 1) + "…") in lines[2] and "x" * TABLE_MAX_WIDTH not in lines[2]
    assert "--format csv or json prints every value whole" in done.stdout


def test_table_output_is_streamed():
    consumed = 0

    def rows():
        nonlocal consumed
        for i in range(TABLE_WIDTH_ROWS * 5):
            consumed += 1
            yield (i, f"v{i}")

    class Out(io.StringIO):
        first_row_at = None

        def write(self, text):
            if self.first_row_at is None and text.startswith("0 "):
                self.first_row_at = consumed
            return super().write(text)

    out = Out()
    assert _write_table(rows(), ["n", "v"], None, out) == TABLE_WIDTH_ROWS * 5
    assert out.first_row_at == TABLE_WIDTH_ROWS  # written long before the last row was read


def test_json_output_is_valid_json_for_nan_and_infinity(idc_fixture):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    done = cli(
        "query", "SELECT 'Infinity'::DOUBLE a, 'NaN'::DOUBLE b, [1.5, 'NaN'::DOUBLE] c, 2.5 d", "--format", "json",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "NaN" not in done.stdout and "Infinity" not in done.stdout
    assert json.loads(done.stdout) == [{"a": None, "b": None, "c": [1.5, None], "d": 2.5}]


def test_a_query_failing_part_way_is_a_query_error_and_leaves_the_output_alone(idc_fixture, tmp_path):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    sql = "SELECT CAST(CASE WHEN i > 160000 THEN 'x' ELSE '1' END AS INT) AS v FROM range(200000) t(i)"
    out = tmp_path / "out.csv"
    out.write_text("old\n")
    for fmt in ("table", "csv", "json", "parquet"):
        done = cli("query", sql, "--format", fmt, "--limit", "300000", "--output", str(out), env=env)
        assert done.returncode == 2, (fmt, done.stderr)
        assert done.stderr.startswith("Error: query failed: Conversion Error"), done.stderr
        assert "everything completed so far" not in done.stderr
        assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_output_names_are_checked_and_dash_is_stdout(idc_fixture, tmp_path):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    missing = cli("query", "SELECT 1 AS a", "--format", "csv", "--output", "nodir/x.csv", cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "the folder nodir does not exist" in missing.stderr
    assert ".tmp" not in missing.stderr and "completed so far" not in missing.stderr
    folder = cli("query", "SELECT 1 AS a", "--format", "csv", "--output", "newdir/", cwd=tmp_path, env=env)
    assert folder.returncode == 2 and "names a folder" in folder.stderr
    dash = cli("query", "SELECT 1 AS a", "--format", "csv", "--output", "-", cwd=tmp_path, env=env)
    assert dash.returncode == 0 and dash.stdout.splitlines() == ["a", "1"]
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_fetch_says_what_is_true(idc_fixture, tmp_path):
    import signal
    import time

    with FileServer(max_lifetime_s=60) as server:
        server.files[f"/{VERSION}/sm_index.parquet"] = b"x"
        server.endless_next(1)
        env = {
            **os.environ,
            "IDC_INDEX_BASE_URL": server.url(""),
            "IDC_EXTRA_INDEX_DIR": str(tmp_path / "indices"),
            "IDC_INDEX_DIR": str(idc_fixture.index_dir),
        }
        proc = subprocess.Popen(
            [str(BIN / "dataset"), "idc", "fetch", "sm_index"], env=env, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while server.stats["bytes_sent"] < 10_000_000 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "not kept" in err and "to resume" not in err
    leftovers = [p for p in (tmp_path / "indices").rglob("*") if p.is_file()]
    assert leftovers == []


# -- found by the hostile review of this round ---------------------------------------------------


def test_query_cannot_write_the_index_files_it_may_read(idc_fixture, tmp_path):
    import hashlib
    import shutil

    index = tmp_path / "idx"
    shutil.copytree(idc_fixture.index_dir, index)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in index.iterdir()}
    for target in ("prior_versions_index.parquet", "collections_index.parquet"):
        for fmt in ("parquet", "csv"):
            sql = (
                "COPY (SELECT * REPLACE ('../../evil' AS collection_id) FROM idc_index) "
                f"TO '{index / target}' (FORMAT {fmt}, USE_TMP_FILE false)"
            )
            done = cli("query", sql, env={"IDC_INDEX_DIR": str(index)})
            assert done.returncode == 2 and "query refused" in done.stderr and "COPY" in done.stderr
    for sql in (
        "SELECT 1; SELECT 2",
        "EXPORT DATABASE '/tmp/x'",
        "CALL pragma_version()",
        "CREATE TABLE t AS SELECT 1",
    ):
        done = cli("query", sql, env={"IDC_INDEX_DIR": str(index)})
        assert done.returncode == 2 and "query refused" in done.stderr, (sql, done.stderr)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in index.iterdir()} == before
    for sql in ("SHOW TABLES", "DESCRIBE idc_index", "FROM idc_index LIMIT 1", "EXPLAIN SELECT 1"):
        assert cli("query", sql, env={"IDC_INDEX_DIR": str(index)}).returncode == 0, sql


def test_hostile_journal_lines_are_dropped_never_a_traceback(tmp_path):
    from dataset_assets.core.transfer.state import compact_state

    state = tmp_path / "s.parquet"
    uuid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    good = SeriesRecord("1.2", uuid, {"a.dcm": 3})
    writer = __import__("dataset_assets.core.transfer.state", fromlist=["Journal"]).Journal(state)
    writer.record("good/", good)
    writer.close()
    with journal_path(state).open("a", encoding="utf-8", errors="surrogatepass") as handle:
        handle.write("[" * 100_000 + "\n")
        handle.write('{"target_dir": "\\ud800/", "crdc_series_uuid": "' + uuid + '"}\n')
        handle.write('{"target_dir": ["a"], "forget": true}\n')
        handle.write(
            json.dumps({"target_dir": "zzz/", "crdc_series_uuid": uuid, "SeriesInstanceUID": "1",
                        "file_count": 10**30, "file_bytes": 10**30, "files_digest": "0" * 64}) + "\n"
        )  # fmt: skip
        handle.write(json.dumps({"target_dir": "uid/", "crdc_series_uuid": uuid, "SeriesInstanceUID": {"x": 1}}) + "\n")
        handle.write(json.dumps({"target_dir": "nl/", "crdc_series_uuid": uuid, "SeriesInstanceUID": "1\n2"}) + "\n")
    messages: list[str] = []
    records = load_state(state, messages.append)
    assert list(records) == ["good/"] and records["good/"].holds({"a.dcm": 3})
    assert any("6 line(s) that are torn or malformed" in m for m in messages), messages
    compact_state(state)
    assert list(load_state(state)) == ["good/"] and not journal_path(state).exists()


def test_links_and_fifos_in_the_control_folder_are_refused(s3, manifest, tmp_path):
    from dataset_assets.core.errors import BadDestinationError, DownloadError
    from dataset_assets.core.transfer.download import EngineOptions, download

    opts = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "qin_pet_phantom.parquet").write_text("precious")
    for sub in ("", "state", "claims", "claims/holders", "locks", "reservations"):
        root = tmp_path / f"root-{sub.replace('/', '-') or 'top'}"
        link = root / ".dataset_assets" / sub if sub else root / ".dataset_assets"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(victim, target_is_directory=True)
        with pytest.raises(BadDestinationError, match="is a link or not a folder"):
            download(manifest, root, opts, EngineOptions(log=lambda _m: None))
        assert sorted(p.name for p in victim.iterdir()) == ["qin_pet_phantom.parquet"]
        assert (victim / "qin_pet_phantom.parquet").read_text() == "precious"
    root = tmp_path / "fifo"
    (root / ".dataset_assets" / "reservations").mkdir(parents=True)
    os.mkfifo(root / ".dataset_assets" / "reservations" / ".lock")
    started = __import__("time").monotonic()
    with pytest.raises(DownloadError, match="not a regular file"):
        download(manifest, root, opts, EngineOptions(log=lambda _m: None))
    assert __import__("time").monotonic() - started < 30


def test_a_password_with_a_raw_slash_is_never_shown(idc_fixture, tmp_path):
    from dataset_assets.core.fmt import redact_url, scrub_text

    url = "http://alice:s3c/r3tpw@127.0.0.1:18555/notfound?token=TOKSECRET"
    assert "s3c" not in redact_url(url) and "r3tpw" not in redact_url(url) and "TOKSECRET" not in redact_url(url)
    assert "r3tpw" not in scrub_text(f"fetching x from {url} now") and "s3c" not in scrub_text(url)
    for base, code in ((url, 2), ("http://alice:pw@[::1/x", 2), ("http://alice:s3c:r3tpw@127.0.0.1:1/x", 3)):
        done = cli("fetch", "sm_index", env={"IDC_INDEX_BASE_URL": base, "IDC_EXTRA_INDEX_DIR": str(tmp_path),
                                              "IDC_INDEX_DIR": str(idc_fixture.index_dir)})  # fmt: skip
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
        for secret in ("s3c", "r3tpw", "TOKSECRET", "pw@"):
            assert secret not in done.stdout + done.stderr


def test_arguments_that_are_not_utf8_and_layouts_with_separators_are_bad_input(idc_fixture, tmp_path):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    for args in (
        ["download", "qin\udcff", str(tmp_path / "d"), "--dry-run"],
        ["download", "qin_pet_phantom", str(tmp_path / "d"), "--layout", "x\udcff/%SeriesInstanceUID/"],
        ["download", "qin_pet_phantom", str(tmp_path / "d"), "--layout", "a\u2028/%SeriesInstanceUID/"],
        ["download", "qin_pet_phantom", str(tmp_path / "d"), "--layout", "a\u0085/%SeriesInstanceUID/"],
    ):
        done = subprocess.run(
            [str(BIN / "dataset"), "idc", *args], capture_output=True, timeout=120, env={**os.environ, **env}
        )
        err = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_table_output_escapes_what_a_terminal_would_act_on(idc_fixture):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir)}
    done = subprocess.run(
        [str(BIN / "dataset"), "idc", "query", "SELECT chr(27) || '[2J' || chr(0) || 'x\\n' || chr(8232) AS v"],
        capture_output=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0
    assert b"\x1b" not in done.stdout and b"\x00" not in done.stdout and "\u2028".encode() not in done.stdout
    assert b"\\x1b[2J\\x00x\\\\n\\u2028" in done.stdout


def test_the_state_that_cannot_be_written_does_not_stop_the_download(s3, manifest, tmp_path, monkeypatch):
    import errno

    from dataset_assets.core.transfer import state as state_module
    from dataset_assets.core.transfer.download import EngineOptions, download

    def full(self, entry):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_module.Journal, "_write", full)
    lines: list[str] = []
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    result = download(manifest, tmp_path / "dl", options, EngineOptions(log=lines.append, batch_files=8))
    assert result.complete_series == manifest.num_rows and result.failed_count == 0
    assert sum("cannot record the state" in line for line in lines) == 1


def test_an_endpoint_with_credentials_is_refused():
    assert "holds credentials" in safety.endpoint_problem("http://a:b@127.0.0.1:1")


def test_the_connection_itself_is_locked_whatever_reaches_it(idc_fixture, tmp_path):
    """Below the statement check: the connection user SQL runs on refuses to be reconfigured,
    to install or load, and to touch files other than the indices."""
    import duckdb

    from dataset_assets.core.index import extra_index
    from dataset_assets.core.index.source import IndexSource

    with extra_index.connect_all(IndexSource(idc_fixture.index_dir), settings.index_store()) as con:
        assert con.execute("SELECT count(*) FROM idc_index").fetchone() == (len(idc_fixture.rows),)
        for sql in (
            "SET autoinstall_known_extensions = true",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            "INSTALL httpfs",
            "LOAD httpfs",
            f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'",
            "SELECT * FROM read_csv('/etc/hostname')",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    assert not (tmp_path / "x.csv").exists()
