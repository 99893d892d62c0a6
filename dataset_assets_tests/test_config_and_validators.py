"""Issue 17, item 12: Dagster resource and run config are checked where they are declared, with
the CLI's rules, and refused in one line naming the field; a layout into the download root's
control folder never replaces a good manifest."""

import math
import os
import subprocess
import sys

import dagster as dg
import pyarrow as pa
import pytest

from dataset_assets.core.errors import LayoutError, OptionError
from dataset_assets.core.select.layout import Layout, layout_problem
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets.defs.downloads.checks import HeaderCheckConfig
from dataset_assets.defs.downloads.download_assets import downloaded_collection
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.resources import IdcResource, S5cmdResource

COLLECTION = "qin_pet_phantom"
CONTROL_LAYOUTS = [
    ".dataset_assets/state/%SeriesInstanceUID/",
    ".dataset_assets/%SeriesInstanceUID",
    ".DataSet_Assets/%collection_id/%SeriesInstanceUID/",
    "./.dataset_assets/%SeriesInstanceUID/",
]


def only_step_failure(result) -> dg.Failure:
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    data = failure.step_failure_data
    assert data.user_failure_data is not None, data.error.to_string()  # a dg.Failure, not a traceback
    assert data.error.cause is None
    return data.user_failure_data


def run_failure_error(result):
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE"]
    return failure.event_specific_data.error


def assert_one_line(text: str, *parts: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for part in parts:
        assert part in text, text


@pytest.fixture
def idc(idc_fixture, tmp_path):
    return IdcResource(
        index_dir=str(idc_fixture.index_dir),
        manifest_dir=str(tmp_path / "manifests"),
        download_dir=str(tmp_path / "idc"),
    )


@pytest.fixture
def good_manifest(idc, tmp_path):
    """A manifest built with the default config: bad config must leave it as it is."""
    assert dg.materialize([collection_manifest], resources={"idc": idc}, partition_key=COLLECTION).success
    path = tmp_path / "manifests" / f"{COLLECTION}.parquet"
    return path, path.read_bytes()


@pytest.mark.parametrize(
    "config, parts",
    [
        ({"max_path": -5}, ["ManifestConfig.max_path", "greater than or equal to 50", "-5"]),
        ({"max_path": 100_001}, ["ManifestConfig.max_path", "less than or equal to 100000"]),
        *(({"layout": layout}, ["ManifestConfig.layout"]) for layout in CONTROL_LAYOUTS),
        ({"layout": "%collection_id/%Nope/"}, ["unknown placeholder '%Nope'"]),  # the index's columns: at build
        ({"layout": "%collection_id/../%SeriesInstanceUID"}, ["ManifestConfig.layout", "'..'"]),
        ({"layout": "%collection_id/x\n/%SeriesInstanceUID"}, ["ManifestConfig.layout", "not allowed"]),
    ],
)
def test_bad_manifest_config_fails_in_one_line_and_keeps_the_manifest(idc, good_manifest, config, parts):
    path, before = good_manifest
    result = dg.materialize(
        [collection_manifest],
        resources={"idc": idc},
        partition_key=COLLECTION,
        run_config={"ops": {"collection_manifest": {"config": config}}},
        raise_on_error=False,
    )
    assert_one_line(only_step_failure(result).description, *parts)
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*"))


def test_control_folder_layout_is_refused_naming_the_folder(idc, good_manifest):
    path, before = good_manifest
    result = dg.materialize(
        [collection_manifest],
        resources={"idc": idc},
        partition_key=COLLECTION,
        run_config={"ops": {"collection_manifest": {"config": {"layout": CONTROL_LAYOUTS[0]}}}},
        raise_on_error=False,
    )
    assert_one_line(only_step_failure(result).description, "control folder .dataset_assets")
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"workers": -1}, "workers"),
        ({"workers": 0}, "workers"),
        ({"workers": 4097}, "workers"),
        ({"retry_count": -1}, "retry_count"),
        ({"retry_count": 101}, "retry_count"),
        ({"part_size_mb": 0}, "part_size_mb"),
        ({"concurrency": 0}, "concurrency"),
        ({"stall_timeout_s": -1.0}, "stall_timeout_s"),
        ({"stall_timeout_s": math.nan}, "stall_timeout_s"),
        ({"stall_timeout_s": math.inf}, "stall_timeout_s"),
        ({"grace_period_s": -1.0}, "grace_period_s"),
        ({"progress_interval_s": 0.0}, "progress_interval_s"),
        ({"endpoint_url": "ftp://127.0.0.1:9"}, "endpoint_url"),
        ({"endpoint_url": "http://127.0.0.1:9/path"}, "endpoint_url"),
        ({"endpoint_url": "http://127.0.0.1:9\n"}, "endpoint_url"),
        ({"allowed_buckets": ["idc-open-data", "Bad_Bucket"]}, "allowed_buckets"),
    ],
)
def test_bad_s5cmd_resource_values_are_refused_when_constructed(kwargs, field):
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        S5cmdResource(**kwargs)
    assert_one_line(str(info.value), f"S5cmdResource.{field}")


def test_the_issues_resource_names_every_bad_field_and_no_secret():
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        S5cmdResource(workers=-1, part_size_mb=0, concurrency=0)
    assert_one_line(str(info.value), "S5cmdResource.workers", "S5cmdResource.part_size_mb", "S5cmdResource.concurrency")
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        S5cmdResource(endpoint_url="http://alice:s3cr3tpw@127.0.0.1:9/x?token=SECRET")
    assert_one_line(str(info.value), "S5cmdResource.endpoint_url")
    assert "s3cr3tpw" not in str(info.value) and "SECRET" not in str(info.value)
    # The bounds hold in the core too, for any caller.
    with pytest.raises(OptionError, match="workers -1"):
        S5cmdOptions(workers=-1)


def test_bad_s5cmd_run_config_fails_the_run_in_one_line(idc, good_manifest, s3, tmp_path, monkeypatch):
    # Run config for a resource replaces every value set in Python: keep the endpoint on loopback.
    monkeypatch.setenv("IDC_S3_ENDPOINT_URL", s3.endpoint_url)
    resources = {"idc": idc, "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1)}
    for config, field in (
        ({"workers": -1, "part_size_mb": 0}, "workers"),
        ({"stall_timeout_s": -3.0}, "stall_timeout_s"),
    ):
        s3.reset_stats()
        result = dg.materialize(
            [downloaded_collection],
            resources=resources,
            partition_key=COLLECTION,
            run_config={"resources": {"s5cmd": {"config": {"endpoint_url": s3.endpoint_url, **config}}}},
            raise_on_error=False,
        )
        error = run_failure_error(result)
        assert error.cause is None and error.cls_name == "DagsterInvalidConfigError"
        assert_one_line(error.message, f"S5cmdResource.{field}")
        assert sum(s3.stats.values()) == 0 and not (tmp_path / "idc" / COLLECTION).exists()


def test_env_var_values_are_checked_when_the_run_starts(idc, good_manifest, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_S5CMD_WORKERS", "-1")
    resource = S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1, workers=dg.EnvVar.int("TEST_S5CMD_WORKERS"))
    result = dg.materialize(
        [downloaded_collection],
        resources={"idc": idc, "s5cmd": resource},
        partition_key=COLLECTION,
        raise_on_error=False,
    )
    assert_one_line(run_failure_error(result).message, "S5cmdResource.workers", "(got -1)")
    assert sum(s3.stats.values()) == 0
    monkeypatch.setenv("TEST_S5CMD_WORKERS", "8")
    ok = dg.materialize([downloaded_collection], resources={"idc": idc, "s5cmd": resource}, partition_key=COLLECTION)
    assert ok.success


def test_header_check_config_is_refused_in_one_line():
    with pytest.raises(dg.Failure) as info:
        HeaderCheckConfig(processes=-1)
    assert_one_line(info.value.description, "HeaderCheckConfig.processes")


def test_launchpad_style_run_config_from_the_dagster_cli_fails_in_one_line(idc_fixture, tmp_path):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "home"),
        "IDC_INDEX_DIR": str(idc_fixture.index_dir),
        "IDC_MANIFEST_DIR": str(tmp_path / "manifests"),
        "IDC_DOWNLOAD_DIR": str(tmp_path / "idc"),
        "IDC_DUCKDB_PATH": str(tmp_path / "idc.duckdb"),
    }
    (tmp_path / "home").mkdir()
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    config = '{"ops": {"collection_manifest": {"config": {"layout": ".dataset_assets/state/%SeriesInstanceUID/"}}}}'
    proc = subprocess.run(
        [
            dagster,
            "asset",
            "materialize",
            "-m",
            "dataset_assets.definitions",
            "--select",
            "collection_manifest",
            "--partition",
            COLLECTION,
            "--config-json",
            config,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode != 0
    line = "dagster._core.definitions.events.Failure: ManifestConfig.layout: layout '.dataset_assets/state/"
    assert line in proc.stdout + proc.stderr
    assert not (tmp_path / "manifests").exists()


@pytest.mark.parametrize("layout", [*CONTROL_LAYOUTS[:3], ".DATASET_ASSETS/%PatientID"])
def test_layout_into_the_control_folder_is_refused_by_the_core(layout):
    assert layout_problem(layout)
    with pytest.raises(LayoutError):
        Layout.parse(layout, ["collection_id", "PatientID", "SeriesInstanceUID"])


def test_layout_problem_checks_all_but_column_names():
    assert layout_problem("%collection_id/%PatientID/%StudyInstanceUID/%Modality_%SeriesInstanceUID/") is None
    assert layout_problem("%AnyColumn/%SeriesInstanceUID") is None
    assert layout_problem("dataset_assets/%SeriesInstanceUID") is None  # not the control folder
    assert "control folder" in layout_problem(".dataset_assets/%AnyColumn/")
    for bad in (
        "",
        "/abs/%SeriesInstanceUID",
        "a//%SeriesInstanceUID",
        "literal/only",
        "%-x",
        "%SeriesInstanceUID.",
        5,
    ):
        assert layout_problem(bad), bad


def test_a_value_rendering_as_the_control_folder_is_moved_off_it():
    table = pa.table(
        {
            "PatientID": [".dataset_assets", ".Dataset_Assets", "p", ".dataset_assets"],
            "SeriesInstanceUID": ["1", "2", "3", "4"],
        }
    )
    dirs = Layout.parse("%PatientID/%SeriesInstanceUID", table.column_names).render(table).to_pylist()
    assert dirs == ["_.dataset_assets/1/", "_.Dataset_Assets/2/", "p/3/", "_.dataset_assets/4/"]
    nested = Layout.parse("x/%PatientID/%SeriesInstanceUID", table.column_names).render(table).to_pylist()
    assert nested[0] == "x/.dataset_assets/1/"  # only the root's control folder is special


def test_cli_refuses_a_control_folder_layout(tmp_path):
    dataset = os.path.join(os.path.dirname(sys.executable), "dataset")
    proc = subprocess.run(
        [dataset, "idc", "download", COLLECTION, str(tmp_path / "d"), "--dry-run", "--layout", CONTROL_LAYOUTS[0]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "control folder .dataset_assets" in proc.stderr and "Traceback" not in proc.stderr
