"""Hostile servers and files against HTTP bundles: capped Retry-After waits, bad bundles files,
links planted where a download writes, answers that are not the file, servers that trickle."""

from __future__ import annotations

import email.utils
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset_assets import settings
from dataset_assets.core.errors import (
    DatasetError,
    DownloadError,
)
from dataset_assets.core.fmt import scrub_text
from dataset_assets.core.http import bundles as http_bundles
from dataset_assets.core.http.bundles import Bundle, download_bundle, load_bundles
from dataset_assets_tests.support.httpserver import FileServer

# -- HTTP bundles (items 14-17) ----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SIZE = 300_000
PAYLOAD = os.urandom(SIZE)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SECRET_URL = "https://user:S3CRETPW@example.org/x?sig=abc"
PRECIOUS = b"a file outside the bundle folder\n"


@pytest.fixture(autouse=True)
def fast_resume(monkeypatch):
    monkeypatch.setattr(http_bundles, "RESUME_BACKOFF_S", 0.01)
    monkeypatch.delenv("DATASET_BUNDLES_MAX_RETRY_AFTER_S", raising=False)


@pytest.fixture
def srv(file_server):
    file_server.files["/d/sample.bin"] = PAYLOAD
    return file_server


def bundle(srv: FileServer, path: str = "/d/sample.bin", **kw) -> Bundle:
    return Bundle(name="sample", url=srv.url(path), **kw)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def one_message(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# -- Retry-After: a bounded, configurable wait


@pytest.mark.timeout(60)
def test_retry_after_is_capped(srv, session, tmp_path):
    """503 + Retry-After: 100000 (28 h) with a 2 s cap fails at once, naming both; no retry sleeps."""
    srv.fail_next(10, status=503, retry_after="100000")
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_bundle(bundle(srv), tmp_path, session=session, max_retry_after_s=2)
    assert time.monotonic() - started < 5
    message = one_message(err)
    assert "100,000 s" in message and "'100000'" in message and "2 s allowed" in message
    assert "HTTP 503" in message and "DATASET_BUNDLES_MAX_RETRY_AFTER_S" in message
    assert srv.stats["get"] == {"/d/sample.bin": 1}  # urllib3 did not retry (nor sleep) on its own
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(60)
def test_cap_from_the_environment_covers_the_default_session(srv, tmp_path, monkeypatch):
    """No session given (``make_session()``'s 5 retries), the cap read from the environment at the
    call: still no 6-hour urllib3 sleep."""
    monkeypatch.setenv("DATASET_BUNDLES_MAX_RETRY_AFTER_S", "2")
    srv.fail_next(10, status=429, retry_after="100000")
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"wait 100,000 s .*longer than the 2 s allowed"):
        download_bundle(bundle(srv), tmp_path, limits=settings.http_limits())
    assert time.monotonic() - started < 5


@pytest.mark.timeout(60)
def test_http_date_beyond_the_cap_fails(srv, session, tmp_path):
    srv.fail_next(1, status=503, retry_after=email.utils.formatdate(time.time() + 3600, usegmt=True))
    with pytest.raises(DownloadError, match=r"wait 3,(599|600) s \((59m59s|1h00m00s); HTTP 503, Retry-After: '"):
        download_bundle(bundle(srv), tmp_path, session=session, max_retry_after_s=2)
    assert srv.stats["get"] == {"/d/sample.bin": 1}


@pytest.mark.timeout(60)
def test_wait_within_the_cap_is_honoured(srv, session, tmp_path):
    srv.fail_next(1, status=503, retry_after="1")
    logs: list[str] = []
    started = time.monotonic()
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session, max_retry_after_s=2, log=logs.append)
    assert 0.9 < time.monotonic() - started < 10
    assert result.path.read_bytes() == PAYLOAD and srv.stats["get"] == {"/d/sample.bin": 2}
    assert any("the server asks to wait 1 s" in line for line in logs)


@pytest.mark.timeout(60)
def test_endless_short_waits_end(srv, session, tmp_path):
    srv.fail_next(100, status=503, retry_after="0")
    with pytest.raises(DownloadError, match=r"HTTP 503 .*asked to wait \(Retry-After\) 4 times"):
        download_bundle(bundle(srv), tmp_path, session=session, attempts=3)
    assert srv.stats["get"] == {"/d/sample.bin": 4}


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_bad_cap_in_the_environment_is_refused(srv, session, tmp_path, monkeypatch, value):
    monkeypatch.setenv("DATASET_BUNDLES_MAX_RETRY_AFTER_S", value)
    with pytest.raises(
        DownloadError,
        match=rf"\$DATASET_BUNDLES_MAX_RETRY_AFTER_S '{value}' is not a number "
        r"of seconds >= 0.*e\.g\. 300",
    ):
        download_bundle(bundle(srv), tmp_path, session=session, limits=settings.http_limits())
    assert srv.stats["get"] == {}


# -- a bad bundles file fails one asset, quietly

LOAD_AND_MATERIALIZE = """
import logging, os
before = dict(os.environ)
import dagster as dg
import dataset_assets.definitions as d
assert dict(os.environ) == before, "the import changed the environment"
dg.Definitions.validate_loadable(d.defs)
print("KEYS", ",".join(sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys())))
asset = d.defs.get_assets_def("http_datasets")
print("PARTITIONED", asset.partitions_def is not None)
result = dg.materialize([asset], raise_on_error=False)
print("SUCCESS", result.success)
print("FAILURE", result.get_step_failure_events()[0].step_failure_data.user_failure_data.description)
"""

BAD_FILES = {
    "syntax": (f"bundles:\n  - {{name: a, url: {SECRET_URL}\n", "is not valid YAML: expected ',' or '}'"),
    "field": (f"bundles:\n  - name: a\n    url: '{SECRET_URL}'\n    size: -1\n", "size -1 is not a non-negative"),
    "entry": (f"bundles:\n  - '{SECRET_URL}'\n", "entry 1: expected a mapping with name and url"),
    "scheme": (
        "bundles:\n  - {name: a, url: 'ftp://user:S3CRETPW@example.org/x?sig=abc'}\n",
        "url ftp://example.org/x?… has scheme 'ftp'",
    ),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_bundles_file_leaves_the_code_location_loading(tmp_path, kind):
    text, problem = BAD_FILES[kind]
    listing = tmp_path / "bundles.yaml"
    listing.write_text(text)
    env = {
        **os.environ,
        "DATASET_BUNDLES_FILE": str(listing),
        "DATASET_BUNDLES_DIR": str(tmp_path / "out"),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    (tmp_path / "dagster_home").mkdir()
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MATERIALIZE], cwd=REPO, env=env, capture_output=True, text=True, timeout=150
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line[:1].isupper() and " " in line)
    assert {"downloaded_collection", "idc_index", "http_datasets"} <= set(lines["KEYS"].split(","))
    assert lines["PARTITIONED"] == "False" and lines["SUCCESS"] == "False"
    assert lines["FAILURE"].startswith(f"bundle file {listing}") and problem in lines["FAILURE"]
    assert "S3CRETPW" not in output and "sig=abc" not in output and "S3CR" not in output


def test_unloadable_file_gives_an_asset_that_fails_with_one_line(tmp_path):
    import dagster as dg

    from dataset_assets.lib.bundles import build_http_datasets_from_file as build_http_datasets

    deep = tmp_path / "deep.yaml"
    deep.write_text("bundles: " + "[" * 50_000)  # PyYAML recurses: RecursionError, not YAMLError
    for path, problem in ((tmp_path / "missing.yaml", "does not exist"), (deep, "nested too deeply")):
        asset = build_http_datasets(path)  # never raises
        assert asset.partitions_def is None
        assert problem in asset.metadata_by_key[asset.key]["bundles_error"]
        result = dg.materialize([asset], raise_on_error=False)
        failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert not result.success and failure.description.startswith(f"bundle file {path}")
        assert problem in failure.description and "\n" not in failure.description


@pytest.mark.parametrize(
    "text",
    [
        f"bundles:\n  - {{name: a, url: {SECRET_URL}\n",
        "bundles:\n  - name: a\n    url: https://user:S3CRETPW@example.org/a/long/path/that/goes/on/and/on/x.zip"
        "?sig=abcdefghijklmnopqrstuvwxyz0123456789 : x\n",
        f"bundles:\n  - name: a\n    url: {SECRET_URL}\n   bad: [\n",
    ],
)
def test_yaml_errors_never_quote_the_offending_line(tmp_path, text):
    """PyYAML's message quotes the line, cut anywhere ('https://user:S3CR ...', '... 6789 : x'):
    a cut secret escapes any pattern, so the message names the line and column instead."""
    path = tmp_path / "bundles.yaml"
    path.write_text(text)
    with pytest.raises(DatasetError, match=r"is not valid YAML: .* at line \d+, column \d+") as err:
        load_bundles(path)
    message = one_message(err)
    assert "S3CR" not in message and "sig=" not in message and "0123456789" not in message
    assert str(path) in message


def test_scrub_removes_user_info_and_queries():
    text = "got str 'https://user:S3CRETPW@example.org/x?sig=abc' and http://u@h/p?q=1)"
    assert scrub_text(text) == "got str 'https://example.org/x?…' and http://h/p?…)"


# -- links planted where the download writes


@pytest.fixture
def outside(tmp_path) -> Path:
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir()
    target.write_bytes(PRECIOUS)
    return target


def test_part_symlink_is_not_followed(srv, session, tmp_path, outside):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / ".sample.bin.part").symlink_to(outside)
    with pytest.raises(DownloadError, match=r"partial file .*\.sample\.bin\.part is a symbolic link .*refusing"):
        download_bundle(bundle(srv), dest, session=session)
    assert outside.read_bytes() == PRECIOUS and (dest / ".sample.bin.part").is_symlink()
    assert srv.stats["get"] == {} and not (dest / "sample.bin").exists()


def test_hard_linked_part_is_refused(srv, session, tmp_path, outside):
    dest = tmp_path / "bundle"
    dest.mkdir()
    os.link(outside, dest / ".sample.bin.part")
    with pytest.raises(DownloadError, match=r"partial file .* has 1 other hard link"):
        download_bundle(bundle(srv), dest, session=session)
    assert outside.read_bytes() == PRECIOUS and srv.stats["get"] == {}


def test_validator_symlink_is_not_followed(srv, session, tmp_path, outside):
    """The validator side-file is written after the first answer: through a link it would
    overwrite the outside file with an ETag (and, read, send its content as If-Range)."""
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / ".sample.bin.part.validator").symlink_to(outside)
    with pytest.raises(DownloadError, match=r"validator file .* is a symbolic link"):
        download_bundle(bundle(srv), dest, session=session)
    assert outside.read_bytes() == PRECIOUS and srv.stats["get"] == {}
    assert (dest / ".sample.bin.part.validator").is_symlink() and not (dest / ".sample.bin.part").exists()


def test_final_name_symlink_is_refused(srv, session, tmp_path, outside):
    """A link at the final name is not taken for the finished download, even to a matching file."""
    outside.write_bytes(PAYLOAD)
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "sample.bin").symlink_to(outside)
    with pytest.raises(DownloadError, match=r"final file .*sample\.bin is a symbolic link"):
        download_bundle(bundle(srv, sha256=SHA), dest, session=session)
    assert outside.read_bytes() == PAYLOAD and (dest / "sample.bin").is_symlink()
    assert srv.stats["get"] == {}


def test_fifo_part_is_refused(srv, session, tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    os.mkfifo(dest / ".sample.bin.part")
    with pytest.raises(DownloadError, match=r"partial file .* is not a regular file"):
        download_bundle(bundle(srv), dest, session=session)
    assert srv.stats["get"] == {}


# -- answers that are not the file


def test_html_error_page_is_refused(srv, session, tmp_path):
    srv.files["/d/sample.bin"] = b"<html><body>Service temporarily unavailable</body></html>\n"
    srv.content_types["/d/sample.bin"] = "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match=r"HTML page \(Content-Type text/html\) instead of sample\.bin") as err:
        download_bundle(bundle(srv), tmp_path, session=session)
    assert "content_type: text/html" in one_message(err)
    assert leftovers(tmp_path) == []


def test_html_is_accepted_when_it_is_the_file(srv, session, tmp_path):
    page = b"<html>the data set's landing page</html>"
    srv.files["/d/index.html"] = srv.files["/d/page"] = page
    srv.content_types["/d/index.html"] = srv.content_types["/d/page"] = "text/html"
    assert download_bundle(bundle(srv, "/d/index.html"), tmp_path / "a", session=session).path.read_bytes() == page
    named = bundle(srv, "/d/page", content_type="text/html")
    assert download_bundle(named, tmp_path / "b", session=session).path.read_bytes() == page


def test_named_content_type_must_match(srv, session, tmp_path):
    srv.content_types["/d/sample.bin"] = "application/octet-stream"
    with pytest.raises(
        DownloadError,
        match=r"Content-Type application/octet-stream, not the bundle's "
        r"content_type application/zip",
    ) as err:
        download_bundle(bundle(srv, content_type="application/zip"), tmp_path, session=session)
    one_message(err)
    assert leftovers(tmp_path) == []
    srv.content_types["/d/sample.bin"] = "Application/ZIP; foo=bar"  # media type only, any case
    result = download_bundle(bundle(srv, content_type="application/zip"), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD
    del srv.content_types["/d/sample.bin"]  # none at all is not the named type either
    with pytest.raises(DownloadError, match=r"Content-Type \(none\)"):
        download_bundle(bundle(srv, content_type="application/zip"), tmp_path / "c", session=session)


def test_content_type_in_the_bundles_file(tmp_path):
    path = tmp_path / "bundles.yaml"
    path.write_text("bundles:\n  - {name: a, url: 'https://example.org/a.zip', content_type: Application/Zip}\n")
    assert load_bundles(path)["a"].content_type == "application/zip"
    path.write_text("bundles:\n  - {name: a, url: 'https://example.org/a.zip', content_type: zip}\n")
    with pytest.raises(
        DatasetError,
        match=r"entry 1 \('a'\): content_type 'zip' is not a media type: use "
        r"type/subtype without parameters, e\.g\. application/zip",
    ):
        load_bundles(path)


def test_body_longer_than_content_length_is_refused(srv, session, tmp_path):
    """A 200 announcing Content-Length: 300,000 whose (chunked) body goes on: reading stops at the
    announced length and the download fails, even without a size or sha256 in the bundle."""
    srv.overlong_next(1, extra=200_000)
    with pytest.raises(
        DownloadError,
        match=r"the server sent more than the 300,000 bytes it announced "
        r"\(Content-Length\)",
    ) as err:
        download_bundle(bundle(srv), tmp_path, session=session, chunk_size=16 * 1024)
    assert "partial file was deleted" in one_message(err)
    assert leftovers(tmp_path) == []


def test_range_body_longer_than_content_range_is_refused(srv, session, tmp_path):
    """A resumed 206 whose Content-Length (and body) exceed its Content-Range: never spliced in."""
    srv.truncate_next(1, fraction=0.4)
    srv.overlong_next(1, extra=5_000)
    with pytest.raises(
        DownloadError,
        match=r"the server sent more than the 180,000 bytes it announced "
        r"\(Content-Range\)",
    ):
        download_bundle(bundle(srv), tmp_path, session=session, attempts=3)
    assert srv.stats["ranges"] == ["bytes=120000-"]
    assert leftovers(tmp_path) == []


def test_a_trickling_http_server_is_stopped(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Trickle(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(http_bundles, "LOW_SPEED_WINDOW_S", 1.5)
    try:
        started = time.monotonic()
        bundle = Bundle(name="slow", url=f"http://127.0.0.1:{server.server_port}/slow.bin")
        with pytest.raises(DownloadError, match="bytes in .* s \\(under 1024 bytes in 1.5 s\\): stopped"):
            download_bundle(bundle, tmp_path / "b", timeout=5)
        assert time.monotonic() - started < 15
    finally:
        server.shutdown()
        server.server_close()
