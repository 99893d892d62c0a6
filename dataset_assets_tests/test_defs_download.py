"""downloaded_collection through Dagster: in process, and killed mid-download from the CLI."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from dataset_assets.defs.downloads.download_assets import downloaded_collection
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.resources import IdcResource, S5cmdResource
from dataset_assets_tests.support.envs import materialize_cmd, project_env
from dataset_assets_tests.support.procs import processes_mentioning


def resources(idc_fixture, tmp_path, server, **s5):
    return {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir),
            manifest_dir=str(tmp_path / "manifests"),
            download_dir=str(tmp_path / "idc"),
        ),
        "s5cmd": S5cmdResource(endpoint_url=server.endpoint_url, retry_count=1, **s5),
    }


def test_materialize_manifest_and_download(idc_fixture, s3, tmp_path):
    res = resources(idc_fixture, tmp_path, s3)
    result = dg.materialize(
        [collection_manifest, downloaded_collection], resources=res, partition_key="qin_pet_phantom"
    )
    assert result.success
    meta = result.asset_materializations_for_node("downloaded_collection")[0].metadata
    assert meta["series_complete"].value == 6 and meta["series_failed"].value == 0
    assert meta["files"].value == 24 and meta["transferred_files"].value == 24
    assert meta["bytes"].value == meta["transferred_bytes"].value > 0
    assert meta["s5cmd_version"].value.startswith("v2.")
    assert meta["download_path"].value == str(tmp_path / "idc" / "qin_pet_phantom")
    assert len(list((tmp_path / "idc" / "qin_pet_phantom").rglob("*.dcm"))) == 24

    s3.reset_stats()
    again = dg.materialize([downloaded_collection], resources=res, partition_key="qin_pet_phantom")
    assert again.success and s3.stats["get_object"] == 0
    assert again.asset_materializations_for_node("downloaded_collection")[0].metadata["transferred_files"].value == 0


def test_failed_series_fail_the_step_with_their_names(idc_fixture, s3, tmp_path):
    res = resources(idc_fixture, tmp_path, s3)
    bad = idc_fixture.rows[0]
    s3.faults.fail_keys(lambda key: key.startswith(bad["crdc_series_uuid"]), status=503)
    result = dg.materialize(
        [collection_manifest, downloaded_collection],
        resources=res,
        partition_key="qin_pet_phantom",
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    text = str(failure.step_failure_data.user_failure_data.description)
    assert "1 of 6 series incomplete" in text and bad["SeriesInstanceUID"] in text
    assert failure.step_failure_data.user_failure_data.metadata["series_complete"].value == 5


def test_file_system_refusal_fails_the_step_naming_the_path(idc_fixture, s3, tmp_path):
    patient = tmp_path / "idc" / idc_fixture.collection_id / idc_fixture.rows[0]["PatientID"]
    patient.parent.mkdir(parents=True)
    patient.symlink_to(patient.name)  # a loop where a patient directory should be
    result = dg.materialize(
        [collection_manifest, downloaded_collection],
        resources=resources(idc_fixture, tmp_path, s3),
        partition_key="qin_pet_phantom",
        raise_on_error=False,
    )
    failure = next(e for e in result.all_events if e.is_step_failure)
    text = str(failure.step_failure_data.user_failure_data.description)
    assert str(patient) in text and "Too many levels of symbolic links" in text and "everything completed" in text
    assert s3.stats["get_object"] == 0


def test_missing_manifest_is_a_clear_error(idc_fixture, s3, tmp_path):
    result = dg.materialize(
        [downloaded_collection],
        resources=resources(idc_fixture, tmp_path, s3),
        partition_key="qin_pet_phantom",
        raise_on_error=False,
    )
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "materialize collection_manifest for this collection first" in str(failure.step_failure_data.error)


@pytest.mark.parametrize("how", ["sigterm-cli", "sigkill-step"])
def test_killed_run_leaves_no_s5cmd_and_rerun_completes(idc_fixture, s3, tmp_path, how):
    download_dir = tmp_path / "idc"
    # The step in a process of its own, to kill it alone.
    env = project_env(idc_fixture, s3, tmp_path, DAGSTER_EXECUTOR="multiprocess")
    args = materialize_cmd("collection_manifest,downloaded_collection", "qin_pet_phantom")
    slow = json.dumps({"resources": {"s5cmd": {"config": {"workers": 1, "retry_count": 1}}}})
    s3.faults.delay_s = 0.5
    proc = subprocess.Popen(
        [*args, "--config-json", slow],
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(s3.get_keys) < 3 and time.monotonic() < deadline:  # s5cmd is mid-download
            assert proc.poll() is None, "the run ended before s5cmd started"
            time.sleep(0.1)
        (s5cmd_pid,) = processes_mentioning(str(download_dir))
        if how == "sigterm-cli":
            os.kill(proc.pid, signal.SIGTERM)
        else:  # the step process, s5cmd's parent, dies without any chance to clean up
            step_pid = int(Path(f"/proc/{s5cmd_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(step_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while processes_mentioning(str(download_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(download_dir)) == []
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    fetched_before = len(set(s3.get_keys))
    assert 0 < fetched_before < 24
    on_disk = len(list(download_dir.rglob("*.dcm")))

    s3.faults.clear()
    s3.reset_stats()
    rerun = subprocess.run([*args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert len(list(download_dir.rglob("*.dcm"))) == 24
    assert s3.stats["get_object"] == 24 - on_disk  # nothing complete is fetched twice
