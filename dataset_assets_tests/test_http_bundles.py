"""HTTP dataset bundles: the YAML loader, and resumable, verified downloads from a loopback server."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import requests

from dataset_assets.core.errors import DatasetError, DownloadError
from dataset_assets.core.http import bundles as http_bundles
from dataset_assets.core.http.bundles import Bundle, download_bundle, load_bundles, make_session, redact_url
from dataset_assets_tests.support.httpserver import FileServer

SIZE = 300_000
PAYLOAD = os.urandom(SIZE)
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SECRET = "X-Amz-Signature=s3cr3tSIG&X-Amz-Credential=AKIDEXAMPLE"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No proxy for the loopback server, and a near-zero resume backoff to keep tests fast."""
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(http_bundles, "RESUME_BACKOFF_S", 0.01)


@pytest.fixture
def srv(file_server):
    file_server.files["/d/sample.bin"] = PAYLOAD
    return file_server


def bundle(srv: FileServer, query: str = "", **kw) -> Bundle:
    return Bundle(name="sample", url=srv.url("/d/sample.bin" + (f"?{query}" if query else "")), **kw)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# ---------------------------------------------------------------------------------- downloads


def test_full_download_verifies_sha256(srv, session, tmp_path):
    logs: list[str] = []
    result = download_bundle(
        bundle(srv, sha256=SHA, size=SIZE), tmp_path / "out", session=session, chunk_size=64 * 1024, log=logs.append
    )
    assert result.path == tmp_path / "out" / "sample.bin"
    assert result.path.read_bytes() == PAYLOAD
    assert (result.bytes, result.sha256, result.transferred_bytes) == (SIZE, SHA, SIZE)
    assert not result.resumed and not result.skipped
    assert leftovers(tmp_path / "out") == ["sample.bin"]
    assert srv.stats["get"] == {"/d/sample.bin": 1} and srv.stats["ranges"] == []
    assert any("complete" in line for line in logs)


def test_unknown_size_and_sha_still_downloads(srv, session, tmp_path):
    result = download_bundle(bundle(srv), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD and result.sha256 == SHA


def test_503s_then_success(srv, session, tmp_path):
    srv.fail_next(2, status=503)
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD
    assert srv.stats["get"]["/d/sample.bin"] == 3


def test_429_throttling_then_success(srv, session, tmp_path):
    srv.throttle_next(2)
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD
    assert srv.stats["get"]["/d/sample.bin"] == 3


def test_truncated_body_resumes_with_range(srv, session, tmp_path):
    srv.truncate_next(1, fraction=0.4)
    logs: list[str] = []
    result = download_bundle(
        bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session, chunk_size=16 * 1024, log=logs.append
    )
    assert result.path.read_bytes() == PAYLOAD and result.resumed
    ranges = srv.stats["ranges"]
    assert len(ranges) == 1 and ranges[0].startswith("bytes=") and ranges[0].endswith("-")
    assert 0 < int(ranges[0][6:-1]) < SIZE
    assert srv.stats["bytes_sent"] < 2 * SIZE
    assert result.transferred_bytes == SIZE  # every byte received once
    assert any("interrupted" in line for line in logs)
    assert leftovers(tmp_path) == ["sample.bin"]


def test_persistent_truncation_keeps_the_part(srv, session, tmp_path):
    srv.truncate_next(3, fraction=0.3)
    with pytest.raises(DownloadError, match="interrupted 3 time") as err:
        download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session, attempts=3)
    assert "run again to resume" in str(err.value)
    part = tmp_path / ".sample.bin.part"
    assert 0 < part.stat().st_size < SIZE and not (tmp_path / "sample.bin").exists()
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session)  # the next run resumes
    assert result.resumed and result.path.read_bytes() == PAYLOAD and not part.exists()


def test_existing_part_resumes(srv, session, tmp_path):
    have = 120_000
    (tmp_path / ".sample.bin.part").write_bytes(PAYLOAD[:have])
    result = download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD
    assert result.resumed and result.transferred_bytes == SIZE - have
    assert srv.stats["ranges"] == [f"bytes={have}-"] and srv.stats["bytes_sent"] == SIZE - have
    assert leftovers(tmp_path) == ["sample.bin"]


def test_complete_part_answered_416_is_used(srv, session, tmp_path):
    (tmp_path / ".sample.bin.part").write_bytes(PAYLOAD)
    result = download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session)
    assert result.path.read_bytes() == PAYLOAD and result.transferred_bytes == 0
    assert srv.stats["ranges"] == [f"bytes={SIZE}-"]


def test_file_changed_on_the_server_is_never_spliced(srv, session, tmp_path):
    """Cut at 40 %, then the server's file changes (same length): If-Range makes the server send
    the new file whole, so the old head is not joined to the new tail. No sha256 to catch it."""
    srv.truncate_next(1, fraction=0.4)
    with pytest.raises(DownloadError, match="interrupted 1 time"):
        download_bundle(bundle(srv), tmp_path, session=session, attempts=1)
    assert (tmp_path / ".sample.bin.part.validator").read_text().startswith('"')
    changed = os.urandom(SIZE)
    srv.files["/d/sample.bin"] = changed
    logs: list[str] = []
    result = download_bundle(bundle(srv), tmp_path, session=session, log=logs.append)
    assert result.path.read_bytes() == changed and not result.resumed
    assert any("the file changed since the part began" in line for line in logs)
    assert leftovers(tmp_path) == ["sample.bin"]


def test_no_validator_and_no_sha256_means_no_resume(srv, session, tmp_path):
    """Without ETag/Last-Modified or a sha256, a part cannot be proven to match: start over."""
    srv.validators = None
    srv.truncate_next(1, fraction=0.4)
    logs: list[str] = []
    result = download_bundle(bundle(srv), tmp_path, session=session, log=logs.append)
    assert result.path.read_bytes() == PAYLOAD and not result.resumed and srv.stats["ranges"] == []
    assert any("cannot be trusted to match; starting over" in line for line in logs)


def test_server_answering_shorter_ranges_is_asked_again(srv, session, tmp_path):
    """HTTP lets a server answer a range with less than asked: keep asking, never fail."""
    srv.truncate_next(1, fraction=0.1)
    srv.max_range_bytes = 70_000
    result = download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session, attempts=2)
    assert result.path.read_bytes() == PAYLOAD and result.resumed
    assert srv.stats["ranges"] == [f"bytes={n}-" for n in (30_000, 100_000, 170_000, 240_000)]


def test_changed_file_behind_a_server_ignoring_if_range_is_caught(srv, session, tmp_path):
    """The server honours Range but not If-Range, and sends only Last-Modified: the 206 of a
    changed file carries another date, so the part starts over instead of being spliced."""
    srv.validators, srv.honour_if_range = "last-modified", False
    srv.truncate_next(1, fraction=0.4)
    with pytest.raises(DownloadError, match="interrupted 1 time"):
        download_bundle(bundle(srv), tmp_path, session=session, attempts=1)
    changed = os.urandom(SIZE)
    srv.files["/d/sample.bin"] = changed
    logs: list[str] = []
    result = download_bundle(bundle(srv), tmp_path, session=session, log=logs.append)
    assert result.path.read_bytes() == changed
    assert any("the file changed on the server (Last-Modified" in line for line in logs)


def test_empty_range_bodies_count_as_interruptions(srv, session, tmp_path):
    """A 206 without Content-Length whose body is empty is no progress: it uses up attempts."""
    (tmp_path / ".sample.bin.part").write_bytes(PAYLOAD[:1000])
    srv.unsized_next(50, fraction=0.0)
    with pytest.raises(DownloadError, match="interrupted 3 time.*range body ended after 0"):
        download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session, attempts=3)
    assert srv.stats["get"]["/d/sample.bin"] == 3


def test_server_ignoring_range_restarts_cleanly(srv, session, tmp_path):
    srv.ignore_range = True
    (tmp_path / ".sample.bin.part").write_bytes(b"x" * 50_000)  # not even a prefix of the payload
    logs: list[str] = []
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session, log=logs.append)
    assert result.path.read_bytes() == PAYLOAD
    assert not result.resumed and result.transferred_bytes == SIZE
    assert srv.stats["ranges"] == ["bytes=50000-"]
    assert any("Range ignored, or the file changed" in line for line in logs)
    assert leftovers(tmp_path) == ["sample.bin"]


def test_wrong_sha256_deletes_the_part(srv, session, tmp_path):
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DownloadError) as err:
        download_bundle(bundle(srv, sha256=wrong), tmp_path, session=session)
    message = str(err.value)
    assert "sample" in message and wrong in message and SHA in message and "sha256 mismatch" in message
    assert leftovers(tmp_path) == []


def test_wrong_size_fails_before_transfer(srv, session, tmp_path):
    with pytest.raises(DownloadError, match=f"expected {SIZE + 1:,} bytes.*{SIZE:,}"):
        download_bundle(bundle(srv, size=SIZE + 1), tmp_path, session=session)
    assert leftovers(tmp_path) == [] and srv.stats["get"] == {"/d/sample.bin": 1}


def test_persistent_500_names_the_status(srv, session, tmp_path):
    srv.fail_next(100, status=500)
    with pytest.raises(DownloadError, match="HTTP 500") as err:
        download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session)
    assert srv.url("/d/sample.bin") in str(err.value)
    assert srv.stats["get"]["/d/sample.bin"] == 4  # the first try and 3 retries
    assert leftovers(tmp_path) == []


def test_missing_file_is_404(srv, session, tmp_path):
    missing = Bundle(name="gone", url=srv.url("/nope.zip"))
    with pytest.raises(DownloadError, match=r"bundle gone: HTTP 404 .*nope\.zip"):
        download_bundle(missing, tmp_path, session=session)
    assert srv.stats["get"] == {"/nope.zip": 1}  # 404 is not retried


def test_rerun_transfers_nothing(srv, session, tmp_path):
    first = download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session)
    again = download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session)
    assert again.skipped and again.transferred_bytes == 0 and again.sha256 == SHA
    assert again.path == first.path and srv.stats["get"]["/d/sample.bin"] == 1
    (tmp_path / ".sample.bin.part").write_bytes(b"left by an older run")
    (tmp_path / ".sample.bin.part.validator").write_text('"old"')
    assert download_bundle(bundle(srv, sha256=SHA, size=SIZE), tmp_path, session=session).skipped
    assert leftovers(tmp_path) == ["sample.bin"]  # what an older run left is cleared away


def test_changed_final_file_is_fetched_again(srv, session, tmp_path):
    (tmp_path / "sample.bin").write_bytes(b"stale")
    result = download_bundle(bundle(srv, sha256=SHA), tmp_path, session=session)
    assert not result.skipped and result.path.read_bytes() == PAYLOAD


def test_signed_url_query_never_shown(srv, session, tmp_path):
    logs: list[str] = []
    signed = bundle(srv, query=SECRET, sha256=SHA)
    assert signed.filename == "sample.bin"
    srv.truncate_next(1)
    download_bundle(signed, tmp_path / "ok", session=session, log=logs.append)  # resumes, logs the URL
    srv.fail_next(1, status=403)
    with pytest.raises(DownloadError) as http_err:
        download_bundle(signed, tmp_path / "denied", session=session, log=logs.append)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = Bundle(name="closed", url=f"http://127.0.0.1:{s.getsockname()[1]}/x.bin?{SECRET}")
    with make_session(retries=0) as quick, pytest.raises(DownloadError) as conn_err:
        download_bundle(closed, tmp_path / "closed", session=quick, log=logs.append)
    for err in (http_err.value, conn_err.value):
        assert "s3cr3tSIG" not in str(err) and "AKIDEXAMPLE" not in str(err) and "?…" in str(err)
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained URL
    assert "HTTP 403" in str(http_err.value)
    assert "s3cr3tSIG" not in "\n".join(logs) and any("?…" in line for line in logs)


def test_concurrent_download_of_the_same_part_is_refused(srv, session, tmp_path):
    import fcntl

    with open(tmp_path / ".sample.bin.part", "a+b") as other:  # another run holds the part
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DownloadError, match="another download is writing"):
            download_bundle(bundle(srv), tmp_path, session=session)
    assert leftovers(tmp_path) == [".sample.bin.part"] and srv.stats["get"] == {}


def test_unwritable_destination(srv, session, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DownloadError, match="not writable"):
        download_bundle(bundle(srv), blocker / "sub", session=session)
    assert srv.stats["get"] == {}


def test_make_session_retry_settings():
    with make_session(retries=4, backoff=0.25) as s:
        retry = s.get_adapter("https://example.org/").max_retries
        assert s.trust_env and s.get_adapter("http://x/").max_retries is retry
        assert (retry.total, retry.connect, retry.read, retry.status) == (4, 4, 4, 4)
        assert retry.backoff_factor == 0.25 and set(retry.status_forcelist) == {429, 500, 502, 503, 504}
        assert retry.allowed_methods == frozenset({"GET", "HEAD"})
        assert not retry.raise_on_status
        # Retry-After is download_bundle's to honour (within its cap), never urllib3's (up to 6 h)
        assert not retry.respect_retry_after_header
        assert retry.is_retry("GET", 503) and not retry.is_retry("GET", 503, has_retry_after=True)


def test_server_head_and_range(srv):
    with requests.Session() as s:
        head = s.head(srv.url("/d/sample.bin"))
        part = s.get(srv.url("/d/sample.bin"), headers={"Range": "bytes=10-"})
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == SIZE and not head.content
    assert part.status_code == 206 and part.content == PAYLOAD[10:]
    assert part.headers["Content-Range"] == f"bytes 10-{SIZE - 1}/{SIZE}"
    assert srv.stats["head"] == {"/d/sample.bin": 1}


# ---------------------------------------------------------------------------------- bundles


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h/a/b/data.zip?sig=1", "data.zip"),
        ("https://h/a/my%20data.tar.gz", "my data.tar.gz"),
        ("https://h/a/", "sample"),
        ("https://h/a/..", "sample"),
        ("https://h/a/..%2F..%2Fetc", "sample"),
        ("https://h/a/x%5Cy", "sample"),
        ("https://h/a/x%00y", "sample"),
    ],
)
def test_default_filename(url, expected):
    assert Bundle(name="sample", url=url).filename == expected


def test_redact_url():
    assert redact_url(f"https://user:pw@h.org/p/f.zip?{SECRET}#frag") == "https://h.org/p/f.zip?…"
    assert redact_url("https://h.org/p/f.zip") == "https://h.org/p/f.zip"


def test_load_bundles(tmp_path):
    path = tmp_path / "bundles.yaml"
    path.write_text(
        "bundles:\n"
        f"  - {{name: one, url: 'https://example.org/x/one.zip?{SECRET}', sha256: '{SHA.upper()}', size: 12}}\n"
        "  - name: two.v2\n"
        "    url: http://example.org/two\n"
        "    filename: two.tar\n"
    )
    bundles = load_bundles(path)
    assert list(bundles) == ["one", "two.v2"]
    assert bundles["one"] == Bundle("one", f"https://example.org/x/one.zip?{SECRET}", SHA, 12, "one.zip")
    assert bundles["two.v2"].filename == "two.tar" and bundles["two.v2"].sha256 is None


def test_load_empty_bundle_list(tmp_path):
    (tmp_path / "b.yaml").write_text("bundles: []\n")
    assert load_bundles(tmp_path / "b.yaml") == {}


GOOD = "https://example.org/f.zip"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"bundles:\n  - {{name: a, url: {GOOD}}}\n  - {{name: a, url: {GOOD}}}\n",
            r"entry 2 \('a'\): duplicate name 'a' \(entry 1",
        ),
        (f"bundles:\n  - {{name: ../etc, url: {GOOD}}}\n", r"entry 1 \('../etc'\): name '../etc' is not valid"),
        (f"bundles:\n  - {{name: -x, url: {GOOD}}}\n", r"name '-x' is not valid"),
        (f"bundles:\n  - {{name: 'a b', url: {GOOD}}}\n", r"name 'a b' is not valid"),
        (f"bundles:\n  - {{name: 7, url: {GOOD}}}\n", r"name 7 is not valid"),
        ("bundles:\n  - {name: a, url: 'ftp://h/f.zip'}\n", r"entry 1 \('a'\): url ftp://h/f.zip has scheme 'ftp'"),
        ("bundles:\n  - {name: a, url: 'file:///etc/passwd'}\n", r"scheme 'file'"),
        ("bundles:\n  - {name: a, url: 'https:///nohost'}\n", r"has no host"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, sha256: abc123}}\n", r"sha256 'abc123' is not 64 hexadecimal digits"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, sha256: '{'g' * 64}'}}\n", r"is not 64 hexadecimal digits"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, size: -1}}\n", r"size -1 is not a non-negative integer"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, size: true}}\n", r"size True is not a non-negative integer"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, filename: ../x}}\n", r"filename '../x' is not a plain file name"),
        (f"bundles:\n  - {{name: a, url: {GOOD}, sha265: x}}\n", r"unknown key\(s\) sha265"),
        ("bundles:\n  - {name: a}\n", r"entry 1 \('a'\): missing url"),
        ("bundles:\n  - just-a-string\n", r"entry 1: expected a mapping"),
        ("bundles: {name: a}\n", r"expected a mapping with a 'bundles' list"),
        ("", r"expected a mapping with a 'bundles' list"),
        (f"bundles: []\nbundels: [{{name: a, url: {GOOD}}}]\n", r"unknown top-level key\(s\) bundels"),
        ("bundles: [\n", r"is not valid YAML"),
    ],
)
def test_bad_bundle_files(tmp_path, text, expected):
    path = tmp_path / "bundles.yaml"
    path.write_text(text)
    with pytest.raises(DatasetError, match=expected) as err:
        load_bundles(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bad_url_message_hides_the_query(tmp_path):
    path = tmp_path / "bundles.yaml"
    path.write_text(f"bundles:\n  - {{name: a, url: 'ftp://h/f.zip?{SECRET}'}}\n")
    with pytest.raises(DatasetError) as err:
        load_bundles(path)
    assert "s3cr3tSIG" not in str(err.value) and "ftp://h/f.zip?…" in str(err.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"bundles:\n  - 'https://h/f.zip?{SECRET}'\n", "got str 'https://h/f.zip?…'"),  # the query cut off
        (f"bundles:\n  - {{name: a, url: https://h/f.zip?{SECRET}\n", "at line 2, column 35"),  # the place only
    ],
)
def test_bundle_file_errors_hide_signed_queries(tmp_path, text, shown):
    path = tmp_path / "bundles.yaml"
    path.write_text(text)
    with pytest.raises(DatasetError) as err:
        load_bundles(path)
    message = str(err.value)
    assert "s3cr3tSIG" not in message and "AKIDEXAMPLE" not in message
    assert shown in message, message


def test_missing_bundle_file(tmp_path):
    with pytest.raises(DatasetError, match=f"bundle file {tmp_path / 'nope.yaml'} does not exist"):
        load_bundles(tmp_path / "nope.yaml")


def test_bundle_constructor_validates():
    with pytest.raises(DatasetError, match="scheme"):
        Bundle(name="a", url="s3://bucket/key")


def test_http_datasets_asset_materializes_partitions(srv, tmp_path, monkeypatch):
    import dagster as dg

    from dataset_assets.lib.bundles import build_http_datasets_from_file as build_http_datasets

    payload = os.urandom(300_000)
    srv.files["/sample.bin"] = payload
    digest = hashlib.sha256(payload).hexdigest()
    listing = tmp_path / "bundles.yaml"
    listing.write_text(
        f"bundles:\n  - name: sample\n    url: {srv.url('/sample.bin')}?sig=SECRET\n    sha256: {digest}\n"
        f"  - name: other\n    url: {srv.url('/other.bin')}\n"
    )
    monkeypatch.setenv("DATASET_BUNDLES_DIR", str(tmp_path / "bundles"))
    asset = build_http_datasets(listing)
    assert asset.partitions_def.get_partition_keys() == ["other", "sample"]
    srv.fail_next(2, status=503)
    result = dg.materialize([asset], partition_key="sample")
    meta = result.asset_materializations_for_node("http_datasets")[0].metadata
    assert meta["bytes"].value == 300_000 and meta["sha256_verified"].value is True
    assert "SECRET" not in meta["url"].value
    assert (tmp_path / "bundles" / "sample" / "sample.bin").read_bytes() == payload
    again = dg.materialize([asset], partition_key="sample")
    assert again.asset_materializations_for_node("http_datasets")[0].metadata["already_complete"].value is True
    missing = dg.materialize([asset], partition_key="other", raise_on_error=False)
    assert not missing.success
