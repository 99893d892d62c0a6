"""Tests for the local S3 test server, driven by the real s5cmd Go binary."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dataset_assets.core.transfer.s5cmd import find_binary
from dataset_assets_tests.support.s3server import LocalS3Server, free_port

S5CMD = find_binary()
BUCKET = "bkt"
NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
# Bypass any proxy for 127.0.0.1: no-proxy opener for urllib requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "s3" / BUCKET).mkdir(parents=True)
    return tmp_path / "s3"


@pytest.fixture
def srv(root: Path):
    with LocalS3Server(root, max_lifetime_s=120) as server:
        yield server


def put(root: Path, key: str, data: bytes) -> Path:
    path = root / BUCKET / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def s5cmd(
    endpoint: str, *args: str, retry: int = 1, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("AWS_", "S3_"))}
    env.update(
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        NO_PROXY="127.0.0.1,localhost",
    )
    cmd = [str(S5CMD), "--no-sign-request", "--endpoint-url", endpoint, "--json", "--retry-count", str(retry), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def make_series(root: Path, n: int = 50, prefix: str = "series") -> dict[str, bytes]:
    files = {f"{prefix}/img{i:03d}.dcm": f"DICM {i}\n".encode() * (i + 1) for i in range(n)}
    for key, data in files.items():
        put(root, key, data)
    return files


# -- with the real s5cmd --------------------------------------------------------


def test_ls_and_cp_prefix(srv, root, tmp_path):
    files = make_series(root, 50)
    put(root, "other/not-me.dcm", b"x")
    ls = s5cmd(srv.endpoint_url, "ls", f"s3://{BUCKET}/series/*")
    assert ls.returncode == 0, ls.stderr
    listed = {e["key"]: e["size"] for e in json_lines(ls.stdout)}
    assert listed == {f"s3://{BUCKET}/{k}": len(v) for k, v in files.items()}
    assert srv.stats["list"] == 1 and srv.stats["get_object"] == 0

    srv.reset_stats()
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/series/*", f"{dest}/")
    assert cp.returncode == 0, cp.stderr
    assert tree(dest) == {k.removeprefix("series/"): v for k, v in files.items()}
    out = json_lines(cp.stdout)
    assert len(out) == 50 and all(e["operation"] == "cp" and e["success"] for e in out)
    stats = srv.stats
    assert stats["get_object"] == 50 and stats["head_object"] == 0 and stats["errors"] == 0
    assert stats["bytes_sent"] == sum(map(len, files.values()))
    assert sorted(srv.get_keys) == sorted(files)
    # s5cmd fetches whole small objects as one ranged GET (50 MiB part size)
    assert {r for _m, _p, r in srv.requests if r} == {"bytes=0-52428799"}


def test_sync_size_only_second_run_does_no_gets(srv, root, tmp_path):
    files = make_series(root, 20)
    dest = tmp_path / "dest"
    first = s5cmd(srv.endpoint_url, "sync", "--size-only", f"s3://{BUCKET}/series/*", f"{dest}/")
    assert first.returncode == 0, first.stderr
    assert srv.stats["get_object"] == 20
    srv.reset_stats()
    second = s5cmd(srv.endpoint_url, "sync", "--size-only", f"s3://{BUCKET}/series/*", f"{dest}/")
    assert second.returncode == 0, second.stderr
    assert srv.stats["get_object"] == 0 and second.stdout.strip() == ""
    # a size change on the server side is picked up, and only that object is fetched
    put(root, "series/img007.dcm", b"changed and longer than before" * 10)
    srv.reset_stats()
    third = s5cmd(srv.endpoint_url, "sync", "--size-only", f"s3://{BUCKET}/series/*", f"{dest}/")
    assert third.returncode == 0, third.stderr
    assert srv.get_keys == ["series/img007.dcm"]
    assert (dest / "img007.dcm").read_bytes() == (root / BUCKET / "series/img007.dcm").read_bytes()
    assert len(tree(dest)) == len(files)


def test_503_then_retry_succeeds(srv, root, tmp_path):
    files = make_series(root, 5)
    srv.faults.fail_next_gets(2, status=503)
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/series/*", f"{dest}/", retry=3)
    assert cp.returncode == 0, cp.stderr
    assert tree(dest) == {k.removeprefix("series/"): v for k, v in files.items()}
    assert srv.stats["get_object"] == 7 and srv.stats["errors"] == 2


def test_failing_key_reports_error_and_leaves_no_file(srv, root, tmp_path):
    files = make_series(root, 4)
    bad = "series/img002.dcm"
    srv.faults.fail_keys({bad}, status=503)
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/series/*", f"{dest}/", retry=1)
    assert cp.returncode == 1
    [err] = json_lines(cp.stderr)
    assert err["operation"] == "cp" and "SlowDown" in err["error"] and "503" in err["error"]
    assert err["command"] == f"cp s3://{BUCKET}/{bad} {dest}/img002.dcm"
    assert srv.get_keys.count(bad) == 2  # first try + one retry
    assert tree(dest) == {k.removeprefix("series/"): v for k, v in files.items() if k != bad}
    srv.faults.clear_faults()
    again = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/{bad}", f"{dest}/")
    assert again.returncode == 0 and (dest / "img002.dcm").read_bytes() == files[bad]


def test_truncated_body_is_retried(srv, root, tmp_path):
    data = os.urandom(256 * 1024)
    put(root, "big/one.bin", data)
    srv.faults.truncate_next_gets(1, fraction=0.5)
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/big/*", f"{dest}/", retry=3)
    assert cp.returncode == 0, cp.stderr
    assert (dest / "one.bin").read_bytes() == data
    assert srv.stats["get_object"] == 2


def test_truncated_body_without_retries_never_leaves_short_file(srv, root, tmp_path):
    data = os.urandom(256 * 1024)
    put(root, "big/one.bin", data)
    srv.faults.truncate_next_gets(10, fraction=0.3)
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/big/*", f"{dest}/", retry=1)
    assert cp.returncode == 1
    [err] = json_lines(cp.stderr)
    assert err["error"] == "unexpected EOF"
    assert srv.stats["get_object"] == 2
    assert not dest.exists() or tree(dest) == {}  # no short file, no temp file left


def test_listing_pages_beyond_1000_keys(srv, root, tmp_path):
    for i in range(1100):
        put(root, f"many/k{i:05d}", b"%d" % i)
    ls = s5cmd(srv.endpoint_url, "ls", f"s3://{BUCKET}/many/*")
    assert ls.returncode == 0, ls.stderr
    assert len(json_lines(ls.stdout)) == 1100
    lists = [p for m, p, _r in srv.requests if "list-type=2" in p]
    assert len(lists) == 2 and "continuation-token=" in lists[1]
    v1 = s5cmd(srv.endpoint_url, "--use-list-objects-v1", "ls", f"s3://{BUCKET}/many/*")
    assert v1.returncode == 0, v1.stderr
    assert len(json_lines(v1.stdout)) == 1100
    srv.reset_stats()
    dest = tmp_path / "dest"
    cp = s5cmd(srv.endpoint_url, "--numworkers", "64", "cp", f"s3://{BUCKET}/many/*", f"{dest}/")
    assert cp.returncode == 0, cp.stderr
    assert len(tree(dest)) == 1100 and srv.stats["get_object"] == 1100


def test_lying_size_is_not_detected_by_s5cmd(srv, root, tmp_path):
    put(root, "lie/a.bin", b"12345678")
    srv.faults.lie_size_keys({"lie/a.bin"}, delta=3)
    ls = s5cmd(srv.endpoint_url, "ls", f"s3://{BUCKET}/lie/*")
    assert [e["size"] for e in json_lines(ls.stdout)] == [11]
    cp = s5cmd(srv.endpoint_url, "cp", f"s3://{BUCKET}/lie/*", f"{tmp_path}/d/")
    assert cp.returncode == 0  # s5cmd trusts the GET body, not the listed size
    assert (tmp_path / "d/a.bin").read_bytes() == b"12345678"


def test_refusing_endpoint_fails_fast():
    start = time.monotonic()
    res = s5cmd(f"http://127.0.0.1:{free_port()}", "ls", f"s3://{BUCKET}/x/*", retry=0)
    assert res.returncode == 1 and "connection refused" in res.stderr
    assert time.monotonic() - start < 5


# -- server behaviour, plain HTTP -------------------------------------------------


def test_http_details(srv, root):
    data = bytes(range(256)) * 4
    put(root, "d/x.bin", data)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", f"/{BUCKET}/d/x.bin", headers={"Range": "bytes=10-19"})
    r = conn.getresponse()
    assert r.status == 206 and r.read() == data[10:20]
    assert r.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    conn.request("GET", f"/{BUCKET}/d/x.bin", headers={"Range": "bytes=-5"})  # same socket
    r = conn.getresponse()
    assert r.status == 206 and r.read() == data[-5:]
    conn.request("HEAD", f"/{BUCKET}/d/x.bin")
    r = conn.getresponse()
    r.read()
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
    assert r.headers["ETag"].startswith('"') and r.headers["Last-Modified"].endswith("GMT")
    conn.request("GET", f"/{BUCKET}/d/x.bin", headers={"Range": "bytes=5000-"})
    r = conn.getresponse()
    assert r.status == 416 and b"<Code>InvalidRange</Code>" in r.read()
    conn.request("GET", f"/{BUCKET}/d/missing")
    r = conn.getresponse()
    assert r.status == 404 and b"<Code>NoSuchKey</Code>" in r.read()
    conn.request("GET", "/nobucket?list-type=2")
    r = conn.getresponse()
    assert r.status == 404 and b"<Code>NoSuchBucket</Code>" in r.read()
    conn.request("GET", f"/{BUCKET}/../../etc/passwd")
    r = conn.getresponse()
    assert r.status == 404
    r.read()
    conn.close()
    assert srv.stats["head_object"] == 1


def test_delimiter_paging_with_small_max_keys(srv, root):
    for d in range(5):
        for f in range(3):
            put(root, f"p/d{d}/f{f}", b"x")
    put(root, "p/top1", b"y")
    put(root, "p/top2", b"yy")
    names, token = [], None
    while True:
        q = "list-type=2&prefix=p/&delimiter=/&max-keys=2" + (f"&continuation-token={token}" if token else "")
        doc = ET.fromstring(_OPENER.open(f"{srv.endpoint_url}/{BUCKET}?{q}", timeout=5).read())
        page = [e.text for e in doc.iterfind("s3:CommonPrefixes/s3:Prefix", NS)]
        page += [e.text for e in doc.iterfind("s3:Contents/s3:Key", NS)]
        assert 1 <= len(page) <= 2
        names += page
        if doc.findtext("s3:IsTruncated", namespaces=NS) != "true":
            break
        token = urllib.parse.quote(doc.findtext("s3:NextContinuationToken", namespaces=NS))
    assert names == [f"p/d{d}/" for d in range(5)] + ["p/top1", "p/top2"]


def test_delay_throttle_stop_and_lifetime(root):
    put(root, "s/a.bin", b"z" * 200_000)
    with LocalS3Server(root) as srv:
        srv.faults.delay_s = 0.3
        t = time.monotonic()
        assert len(_OPENER.open(f"{srv.endpoint_url}/{BUCKET}/s/a.bin", timeout=5).read()) == 200_000
        assert time.monotonic() - t >= 0.3
        srv.faults.clear()
        srv.faults.throttle_bytes_per_s = 1_000_000
        t = time.monotonic()
        assert len(_OPENER.open(f"{srv.endpoint_url}/{BUCKET}/s/a.bin", timeout=5).read()) == 200_000
        assert time.monotonic() - t >= 0.15  # 200 kB at 1 MB/s; no upper bound: CI may be busy
        port = srv.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    short = LocalS3Server(root, max_lifetime_s=0.3).start()
    deadline = time.monotonic() + 15  # it stops itself soon after 0.3 s; poll rather than guess how soon
    while True:
        try:
            socket.create_connection(("127.0.0.1", short.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the server did not stop itself"
        time.sleep(0.1)
    short.stop()  # idempotent
