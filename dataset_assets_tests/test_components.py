"""Declarations as Dagster components: the IdcCohorts type in a ``defs.yaml``, built in Dagster's own
sandbox; the shipped declarations; `dg check yaml` naming the line of a mistake; the deprecated
environment-variable file still read, with a warning."""

import hashlib
import shutil
import subprocess
import warnings
from pathlib import Path

import dagster as dg
import pytest
from dagster.components.testing import create_defs_folder_sandbox

from dataset_assets.components import HttpBundles, IdcCohorts, IdcWatchedCollections
from dataset_assets.defs.resources import defs as resource_defs

REPO = Path(__file__).resolve().parents[1]
DG = REPO / ".venv" / "bin" / "dg"


def _declare(component_cls: type, attributes: dict) -> dg.Definitions:
    """The definitions a ``defs.yaml`` of ``component_cls`` with ``attributes`` builds, in Dagster's sandbox."""
    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(
            component_cls=component_cls,
            defs_yaml_contents={
                "type": f"dataset_assets.components.{component_cls.__name__}",
                "attributes": attributes,
            },
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            assert isinstance(component, component_cls)
            return defs


def _build(attributes: dict) -> dg.Definitions:
    return dg.Definitions.merge(_declare(IdcCohorts, attributes), resource_defs)  # the project's resources too


def _partitions(defs: dg.Definitions) -> list[str]:
    return defs.resolve_assets_def("downloaded_cohort").partitions_def.get_partition_keys()


def test_declared_cohorts_become_partitions_with_their_checks(monkeypatch):
    monkeypatch.delenv("IDC_COHORTS_FILE", raising=False)
    defs = _build(
        {
            "cohorts": [
                {"name": "pt_only", "collection_id": "qin_pet_phantom", "modalities": ["PT"]},
                {"name": "by_sql", "sql": "SELECT SeriesInstanceUID FROM idc_index LIMIT 3"},
            ]
        }
    )
    assert _partitions(defs) == ["by_sql", "pt_only"]
    assert defs.resolve_assets_def("cohort_manifest").partitions_def.get_partition_keys() == ["by_sql", "pt_only"]
    checks = defs.resolve_asset_graph().asset_check_keys
    assert {key.name for key in checks if key.asset_key.path == ["downloaded_cohort"]} == {
        "files_match_manifest",
        "dicom_headers_match_manifest",
        "no_stray_files",
        "licences_allow_any_use",
    }


@pytest.mark.parametrize(
    ("cohort", "why"),
    [
        ({"name": "a b", "sql": "SELECT 1"}, "cohort name"),
        ({"name": "x"}, "needs exactly one of `sql` or `collection_id`"),
        ({"name": "x", "sql": "SELECT 1", "modalities": ["CT"]}, "go with `collection_id`"),
        ({"name": "x", "collection_id": "c", "modalities": ["C\nT"]}, "no control characters"),
        ({"name": "line\n", "sql": "SELECT 1"}, "cohort name"),
    ],
)
def test_a_cohort_that_cannot_be_used_leaves_no_partitions_and_says_why(monkeypatch, cohort, why):
    monkeypatch.delenv("IDC_COHORTS_FILE", raising=False)
    defs = _build({"cohorts": [cohort]})  # the component builds: the code location loads
    assert _partitions(defs) == []
    description = defs.resolve_assets_def("cohort_manifest").specs_by_key[dg.AssetKey("cohort_manifest")].description
    assert "Cohort declarations problem:" in description and why in description
    assert "\n" not in description.split("Cohort declarations problem:")[1]


def test_the_deprecated_cohorts_file_is_read_instead_with_a_warning(monkeypatch, tmp_path):
    legacy = tmp_path / "cohorts.yaml"
    legacy.write_text("cohorts: [{name: from_file, collection_id: qin_pet_phantom}]\n")
    monkeypatch.setenv("IDC_COHORTS_FILE", str(legacy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = _build({"cohorts": [{"name": "declared", "sql": "SELECT 1"}]})
    assert _partitions(defs) == ["from_file"]
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("IDC_COHORTS_FILE" in m and "defs.yaml" in m for m in messages), messages


def test_the_shipped_declarations_load(monkeypatch):
    monkeypatch.delenv("IDC_COHORTS_FILE", raising=False)
    from dataset_assets.definitions import defs

    assert _partitions(defs) == ["qin_pet_phantom_pt", "uw_phantom_and_rtstruct"]


def test_dg_check_yaml_names_the_file_and_line_of_a_wrong_type(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(
        REPO, project, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".ruff_cache")
    )
    good = subprocess.run([str(DG), "check", "yaml"], cwd=project, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    yaml_file = project / "dataset_assets" / "defs" / "cohorts" / "defs.yaml"
    text = yaml_file.read_text()
    assert "      modalities: [PT]\n" in text
    yaml_file.write_text(text.replace("      modalities: [PT]\n", "      modalities: {PT: 1}\n"))
    # Dagster points at the `cohorts:` list (a field may also be a template string) and quotes the bad cohort
    line = next(i for i, row in enumerate(yaml_file.read_text().splitlines(), 1) if row == "  cohorts:")
    bad = subprocess.run([str(DG), "check", "yaml"], cwd=project, capture_output=True, text=True, timeout=300)
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out
    assert f"dataset_assets/defs/cohorts/defs.yaml:{line}" in out, out
    assert "'modalities': {'PT': 1}" in out
    yaml_file.write_text(text.replace("      modalities: [PT]\n", "      modality: [PT]\n"))  # a misspelt key
    bad = subprocess.run([str(DG), "check", "yaml"], cwd=project, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "'modality': ['PT']" in bad.stdout + bad.stderr


def _build_bundles(attributes: dict) -> dg.Definitions:
    return _declare(HttpBundles, attributes)


def test_declared_bundles_download_with_the_signed_url_from_the_environment(file_server, tmp_path, monkeypatch):
    payload = b"bundle bytes " * 10_000
    file_server.files["/b/sample.bin"] = payload
    monkeypatch.delenv("DATASET_BUNDLES_FILE", raising=False)
    monkeypatch.setenv("SAMPLE_SIGNED_URL", file_server.url("/b/sample.bin") + "?X-Amz-Signature=S3CRET")
    monkeypatch.setenv("DATASET_BUNDLES_DIR", str(tmp_path / "bundles"))
    digest = hashlib.sha256(payload).hexdigest()
    defs = _build_bundles(
        {
            "bundles": [
                {"name": "sample", "url": "{{ env.SAMPLE_SIGNED_URL }}", "sha256": digest},
                {"name": "other", "url": "https://example.org/other.zip"},
            ]
        }
    )
    asset = defs.resolve_assets_def("http_datasets")
    assert asset.partitions_def.get_partition_keys() == ["other", "sample"]
    result = dg.materialize([asset], partition_key="sample")
    meta = result.asset_materializations_for_node("http_datasets")[0].metadata
    assert meta["sha256_verified"].value is True and "S3CRET" not in str(meta)
    assert (tmp_path / "bundles" / "sample" / "sample.bin").read_bytes() == payload


def test_a_bundle_that_cannot_be_used_leaves_http_datasets_without_partitions(monkeypatch):
    monkeypatch.delenv("DATASET_BUNDLES_FILE", raising=False)
    defs = _build_bundles(
        {"bundles": [{"name": "a", "url": "ftp://user:S3CRETPW@example.org/x?sig=abc"}, {"name": "b", "url": "x"}]}
    )
    asset = defs.resolve_assets_def("http_datasets")
    assert asset.partitions_def is None
    problem = asset.metadata_by_key[asset.key]["bundles_error"]
    assert "entry 1 ('a')" in problem and "has scheme 'ftp'" in problem
    assert "S3CRETPW" not in problem and "sig=abc" not in problem and "\n" not in problem
    result = dg.materialize([asset], raise_on_error=False)
    assert not result.success


def test_the_deprecated_bundles_file_is_read_instead_with_a_warning(monkeypatch, tmp_path):
    legacy = tmp_path / "bundles.yaml"
    legacy.write_text("bundles: [{name: from_file, url: 'https://example.org/f.zip'}]\n")
    monkeypatch.setenv("DATASET_BUNDLES_FILE", str(legacy))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = _build_bundles({"bundles": [{"name": "declared", "url": "https://example.org/d.zip"}]})
    assert defs.resolve_assets_def("http_datasets").partitions_def.get_partition_keys() == ["from_file"]
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("DATASET_BUNDLES_FILE" in m and "defs.yaml" in m for m in messages), messages


def test_the_cli_reads_the_declared_bundles_and_their_environment_templates(file_server, tmp_path):
    from dataset_assets_tests.test_cli import assert_one_line_error, run

    payload = b"declared " * 5_000
    file_server.files["/c/data.bin"] = payload
    declared = tmp_path / "defs.yaml"
    declared.write_text(
        "type: dataset_assets.components.HttpBundles\n"
        "attributes:\n  bundles:\n    - name: data\n      url: '{{ env.DATA_URL }}'\n"
    )
    missing = run("http", "download", "data", str(tmp_path / "out"), "--bundles-file", str(declared))
    assert_one_line_error(missing, 2, "url needs $DATA_URL, which is not set")
    done = run(
        "http",
        "download",
        "data",
        str(tmp_path / "out"),
        "--bundles-file",
        str(declared),
        env={"DATA_URL": file_server.url("/c/data.bin") + "?sig=S3CRET"},
    )
    assert done.returncode == 0, done.stderr
    assert "S3CRET" not in done.stdout + done.stderr
    assert (tmp_path / "out" / "data.bin").read_bytes() == payload


def test_the_shipped_bundles_declaration_loads(monkeypatch):
    monkeypatch.delenv("DATASET_BUNDLES_FILE", raising=False)
    from dataset_assets.definitions import defs

    asset = defs.resolve_assets_def("http_datasets")
    assert asset.partitions_def.get_partition_keys() == [] and "bundles_error" not in asset.metadata_by_key[asset.key]


def _build_watched(attributes: dict) -> dg.Definitions:
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.jobs import download_collections_job
    from dataset_assets.lib.watched import with_watched_freshness

    downloads = dg.Definitions(
        assets=[downloaded_collection], jobs=[download_collections_job], resources=resource_defs.resources
    )
    return with_watched_freshness(dg.Definitions.merge(_declare(IdcWatchedCollections, attributes), downloads))


def _freshness(defs: dg.Definitions):
    key = dg.AssetKey("downloaded_collection")
    return defs.resolve_assets_def(key).specs_by_key[key].freshness_policy


def test_watched_collections_get_a_schedule_and_a_freshness_policy(monkeypatch):
    monkeypatch.delenv("IDC_WATCHED_COLLECTIONS", raising=False)
    defs = _build_watched({"collections": ["qin_pet_phantom"], "cron_schedule": "30 4 * * *", "stale_after_hours": 72})
    (schedule,) = defs.schedules
    assert schedule.name == "watched_collections_schedule" and schedule.cron_schedule == "30 4 * * *"
    assert "qin_pet_phantom" in schedule.description
    assert _freshness(defs).fail_window.to_timedelta().days == 3
    assert _freshness(_build_watched({"collections": []})) is None  # nothing watched: never stale


def test_the_deprecated_watch_variable_is_read_instead_with_a_warning(monkeypatch):
    monkeypatch.setenv("IDC_WATCHED_COLLECTIONS", "nlst, qin_pet_phantom")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        defs = _build_watched({"collections": ["lidc_idri"]})
    (schedule,) = defs.schedules
    assert "nlst, qin_pet_phantom" in schedule.description and "lidc_idri" not in schedule.description
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("IDC_WATCHED_COLLECTIONS" in m and "defs.yaml" in m for m in messages), messages


def _special_file(kind: str, tmp_path: Path) -> Path:
    """A path a deprecated declarations variable might name that no reader may hang or drown on."""
    import os

    if kind == "endless device":
        return Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "cohorts.fifo"
        os.mkfifo(path)  # nobody writes: a plain read would wait forever
        return path
    path = tmp_path / "huge.yaml"
    with path.open("wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB of NULs, beyond the 4 MiB a declarations file may hold
    return path


def _within(seconds: float, work):
    """``work()``'s result, failing the test (not hanging it) when it takes longer than ``seconds``."""
    import threading

    result: list = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still reading after {seconds} s"
    return result[0]


@pytest.mark.parametrize("kind", ["endless device", "fifo", "oversized"])
def test_a_deprecated_cohorts_file_that_never_ends_is_refused_in_one_line(monkeypatch, tmp_path, kind):
    monkeypatch.setenv("IDC_COHORTS_FILE", str(_special_file(kind, tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        defs = _within(60, lambda: _build({"cohorts": [{"name": "declared", "sql": "SELECT 1"}]}))
    assert _partitions(defs) == []
    description = defs.resolve_assets_def("cohort_manifest").specs_by_key[dg.AssetKey("cohort_manifest")].description
    problem = description.split("Cohort declarations problem:")[1]
    expected = "larger than 4,194,304 bytes" if kind == "oversized" else "not a regular file"
    assert "cannot be read" in problem and expected in problem and "\n" not in problem


@pytest.mark.parametrize("kind", ["endless device", "fifo", "oversized"])
def test_a_deprecated_bundles_file_that_never_ends_is_refused_in_one_line(monkeypatch, tmp_path, kind):
    monkeypatch.setenv("DATASET_BUNDLES_FILE", str(_special_file(kind, tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        defs = _within(60, lambda: _build_bundles({"bundles": [{"name": "d", "url": "https://example.org/d.zip"}]}))
    asset = defs.resolve_assets_def("http_datasets")
    assert asset.partitions_def is None
    problem = asset.metadata_by_key[asset.key]["bundles_error"]
    expected = "larger than 4,194,304 bytes" if kind == "oversized" else "not a regular file"
    assert "cannot be read" in problem and expected in problem and "\n" not in problem


def test_a_declarations_file_linked_in_is_read(tmp_path):
    """A ConfigMap mounts its files as links: a link to a declarations file is followed."""
    from dataset_assets.core.http.bundles import load_bundles
    from dataset_assets.core.select.cohort_file import load_cohorts

    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "cohorts.yaml").write_text("cohorts: [{name: linked, collection_id: qin_pet_phantom}]\n")
    (tmp_path / "..data" / "bundles.yaml").write_text("bundles: [{name: linked, url: 'https://example.org/f.zip'}]\n")
    for name in ("cohorts.yaml", "bundles.yaml"):
        (tmp_path / name).symlink_to(tmp_path / "..data" / name)
    assert list(load_cohorts(tmp_path / "cohorts.yaml")) == ["linked"]
    assert list(load_bundles(tmp_path / "bundles.yaml")) == ["linked"]


@pytest.mark.parametrize("kind", ["endless device", "fifo", "oversized"])
def test_a_portal_manifest_that_never_ends_is_refused_in_one_line(tmp_path, kind):
    from dataset_assets.core.errors import FilterError
    from dataset_assets.core.select.portal_manifest import read_entries

    path = _special_file(kind, tmp_path)

    def attempt():
        try:
            read_entries(path)
        except FilterError as exc:
            return str(exc)
        return "read"

    expected = "larger than 209,715,200 bytes" if kind == "oversized" else "not a regular file"
    if kind == "oversized":
        with path.open("r+b") as handle:
            handle.truncate(201 << 20)
    assert _within(60, attempt) == f"manifest file {path} cannot be read: {expected}"
