"""Shared fixtures: a small IDC release (real rows, real DICOM) served by a loopback S3 server."""

import shutil

import pytest

from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.manifest import build_manifest
from dataset_assets_tests.support.fixture import build_fixture
from dataset_assets_tests.support.s3server import LocalS3Server

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """No test may reach another address: no proxy (requests would send 127.0.0.1 traffic to
    it), and s5cmd's metadata-service lookup is off (the core sets that for s5cmd too)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dataset-cache")


@pytest.fixture(autouse=True)
def private_cache(_session_cache, monkeypatch):
    """The project's user-level cache (collection ids, index facts) in the session's own folder,
    never the home of whoever runs the tests; tests that need a cold cache set their own."""
    monkeypatch.setenv("DATASET_CACHE_DIR", str(_session_cache))


@pytest.fixture(scope="session")
def idc_fixture(tmp_path_factory):
    """6 real qin_pet_phantom series, 4 DICOM files each, one series in idc-open-data-two."""
    return build_fixture(tmp_path_factory.mktemp("idc-fixture"))


@pytest.fixture
def s3(idc_fixture, tmp_path):
    """A loopback S3 server over a private copy of the fixture's buckets (tests may damage it)."""
    root = tmp_path / "s3"
    shutil.copytree(idc_fixture.s3_root, root)
    with LocalS3Server(root, max_lifetime_s=600) as server:
        yield server


@pytest.fixture
def env(idc_fixture, s3, tmp_path):
    """The CLI's environment on the fixture index and the loopback S3 server (modules may override it)."""
    return {
        "IDC_INDEX_DIR": str(idc_fixture.index_dir),
        "IDC_S3_ENDPOINT_URL": s3.endpoint_url,
        "IDC_EXTRA_INDEX_DIR": str(tmp_path / "indices"),
    }


@pytest.fixture
def manifest(idc_fixture):
    with IndexSource(idc_fixture.index_dir).connect() as con:
        return build_manifest(con, idc_fixture.collection_id)


@pytest.fixture
def file_server():
    """A loopback HTTP file server (``support/httpserver.py``) that stops after the test."""
    from dataset_assets_tests.support.httpserver import FileServer

    with FileServer(max_lifetime_s=120) as server:
        yield server


@pytest.fixture
def session():
    """The HTTP bundles' requests session, with fast retries."""
    from dataset_assets.core.http.bundles import make_session

    with make_session(retries=3, backoff=0) as s:
        yield s
