"""The Dagster UI as a person sees it, end to end, in headless Chromium driven by Playwright.

Setup, as a user would have it after `dagster asset materialize` from CI:

* ``idc_index`` and ``collection_manifest[qin_pet_phantom]`` are materialized from the real
  installed index (so the UI shows every collection as a partition, and real numbers);
* ``collection_manifest[rider_breast_mri]`` is materialized from a small fixture index
  (3 real series, 3 real DICOM files each) whose objects a loopback S3 server serves, so that
  ``downloaded_collection[rider_breast_mri]`` can really be downloaded from the UI;
* then ``dagster dev`` (webserver + daemon) starts on a free 127.0.0.1 port with that instance.

Checked in the browser: the catalog; the lineage graph (nodes and edges
idc_index -> collection_manifest -> downloaded_collection); the partitions of
collection_manifest (one per collection: qin_pet_phantom, nlst, ...); the manifest's metadata
(series, instances, size, dagster/row_count, the preview table); description, owners, kinds;
a materialization of downloaded_collection launched from the partition dialog that runs to
success; and a second one, on a throttled server, terminated with the run page's Terminate
button: the run ends CANCELED, no s5cmd survives, no cut-short file stands at a final path.
Screenshots of every step go to ``test-artifacts/ui/``; on failure also ``failure.png``
and ``dagster-dev.log`` (the server's output).

Without Chromium the test skips locally and fails in CI (``$CI`` set), where ``.ci/run``
installs it.
"""

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.index.source import IndexSource, collection_ids
from dataset_assets_tests.support.envs import materialize_cmd
from dataset_assets_tests.support.fixture import build_fixture
from dataset_assets_tests.support.procs import processes_mentioning
from dataset_assets_tests.support.s3server import LocalS3Server
from dataset_assets_tests.support.webserver import DagsterDev, dagster_home

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MANIFEST_COLLECTION = "qin_pet_phantom"  # real index: real numbers in the UI
DOWNLOAD_COLLECTION = "rider_breast_mri"  # fixture index + loopback S3: downloaded from the UI
LISTED = ["4d_lung", "lidc_idri", "nlst", "qin_pet_phantom", "rider_breast_mri", "tcga_brca"]
WAIT_MS = 45_000  # UI loads take 10-30 s on a busy 2-core machine

# Hard cap on the whole test: a hung server or browser fails it instead of hanging CI.
pytestmark = pytest.mark.timeout(300)


def chromium_executable() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_chromium() -> str:
    """Chromium's path; without it (or without playwright) fail in CI, skip elsewhere."""
    path = chromium_executable()
    if path is None or importlib.util.find_spec("playwright") is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium (/usr/bin/chromium) or the playwright package is missing; .ci/run installs both")
        pytest.skip(
            "Chromium (/usr/bin/chromium) or the playwright package is missing: `apt-get install chromium` "
            "and `pip install -e '.[test]'`; CI (.ci/run, $CI set) installs both and fails instead of skipping"
        )
    return path


def fresh_artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.log")]:
        old.unlink()
    return ARTIFACTS


def materialize(env: dict, cwd: Path, select: str, partition: str) -> None:
    proc = subprocess.run(
        materialize_cmd(select, partition),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


class Steps:
    """Numbered full-page screenshots of each step."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.n, self.paths = page, folder, 0, []

    def shot(self, name: str) -> None:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=path, full_page=True, animations="disabled")  # no half-faded dialogs
        self.paths.append(path)


def visible(scope, text: str):
    """The visible element whose whole text is ``text`` (Dagster renders some names twice: one hidden)."""
    return scope.get_by_text(text, exact=True).filter(visible=True).first


def metadata_row(scope, key: str):
    """The metadata table row of ``key``."""
    return scope.locator("tr").filter(has=scope.get_by_text(key, exact=True)).first


LINEAGE_JS = """() => {
  const boxes = {};
  for (const el of document.querySelectorAll('[data-tooltip]')) {
    let node = el;  // the asset node: the nearest ancestor with the node's rows
    while (node && !(node.innerText || '').includes('Latest event')) node = node.parentElement;
    if (!node) continue;
    const r = node.getBoundingClientRect(), name = el.getAttribute('data-tooltip');
    if (!boxes[name] || r.width * r.height < boxes[name].w * boxes[name].h)
      boxes[name] = {x: r.left, y: r.top, w: r.width, h: r.height};
  }
  const edges = [];
  for (const path of document.querySelectorAll('svg path[marker-end]')) {
    const m = path.getScreenCTM(), n = path.getTotalLength();
    const a = path.getPointAtLength(0).matrixTransform(m), b = path.getPointAtLength(n).matrixTransform(m);
    edges.push({x1: a.x, y1: a.y, x2: b.x, y2: b.y});
  }
  return {boxes, edges};
}"""


def launch_download(page, steps=None) -> str:
    """From the downloaded_collection page: Materialize…, pick the partition, launch, open the run."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Materialize…").click()
    # downloaded_collection depends on its shards, which this collection was not split into: Dagster
    # asks once whether to go on without them (the download does not need them)
    sure = page.locator(".dagster-dialog").filter(has_text="downloaded_collection_shard")
    expect(sure).to_be_visible()
    sure.get_by_role("button", name="Confirm").click()
    expect(sure).to_be_hidden()  # its overlay gone: a click now reaches the launch dialog
    dialog = page.locator(".dagster-dialog").filter(has_text="Launch runs to materialize downloaded_collection")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_text("0 partitions", exact=True)).to_be_visible()  # "Custom", nothing chosen yet
    picker = dialog.get_by_text("Select a partition or create one")
    for _ in range(3):  # the dialog may still be animating in: open the picker until its list shows
        picker.click()
        try:
            expect(page.locator(".dagster-popover")).to_be_visible(timeout=5_000)
            break
        except AssertionError:
            continue
    page.keyboard.type(DOWNLOAD_COLLECTION)
    visible(page.locator(".dagster-popover"), DOWNLOAD_COLLECTION).click()
    page.keyboard.press("Escape")  # closes the partition picker, not the dialog
    expect(page.locator(".dagster-popover")).to_be_hidden()
    expect(dialog).to_be_visible()
    expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    launch = dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    if steps:
        steps.shot("launch-dialog")
    launch.click()
    toast = page.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))
    expect(toast).to_be_visible()
    short_id = toast.inner_text().split()[-1]
    page.get_by_role("link", name="View", exact=True).click()
    expect(page).to_have_url(re.compile(rf"/runs/{short_id}[0-9a-f-]+"))
    return page.url.split("/runs/")[1].split("?")[0]


def drawn_edges(page) -> set[tuple[str, str]]:
    """(upstream, downstream) pairs for which an arrow runs from one node's right side to the other's left."""
    graph = page.evaluate(LINEAGE_JS)
    boxes, pairs = graph["boxes"], set()
    for e in graph["edges"]:
        for src, a in boxes.items():
            for dst, b in boxes.items():
                if (
                    src != dst
                    and abs(e["x1"] - (a["x"] + a["w"])) < 15
                    and a["y"] <= e["y1"] <= a["y"] + a["h"]
                    and abs(e["x2"] - b["x"]) < 15
                    and b["y"] <= e["y2"] <= b["y"] + b["h"]
                ):
                    pairs.add((src, dst))
    return pairs


RUN_QUERY = """query Run($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status tags { key value } } } }"""
RUNS_QUERY = """{ runsOrError { ... on Runs { results { runId status } } } }"""


def test_ui_lineage_partitions_metadata_and_a_download_launched_from_the_ui(tmp_path):
    chromium = require_chromium()
    from playwright.sync_api import expect, sync_playwright

    artifacts = fresh_artifacts()

    started = time.monotonic()
    installed = IndexSource.installed()
    with installed.connect() as con:
        all_collections = collection_ids(con)
    fixture = build_fixture(tmp_path / "fixture", collection_id=DOWNLOAD_COLLECTION, n_series=3, files_per_series=3)
    home = dagster_home(tmp_path / "home")
    download_dir = tmp_path / "idc"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDC_")}  # the real installed index
    env.update(
        DAGSTER_HOME=str(home),
        IDC_DUCKDB_PATH=str(tmp_path / "idc.duckdb"),
        IDC_MANIFEST_DIR=str(tmp_path / "manifests"),
        IDC_DOWNLOAD_DIR=str(download_dir),
    )
    materialize({**env, "IDC_INDEX_DIR": str(fixture.index_dir)}, tmp_path, "collection_manifest", DOWNLOAD_COLLECTION)
    materialize(env, tmp_path, "idc_index,collection_manifest", MANIFEST_COLLECTION)
    manifest = pq.read_table(tmp_path / "manifests" / f"{MANIFEST_COLLECTION}.parquet")
    series, instances = manifest.num_rows, pc.sum(manifest["instanceCount"]).as_py()
    size = human_bytes(round(pc.sum(manifest["series_size_MB"]).as_py() * 1e6))
    files_expected = sum(r["instanceCount"] for r in fixture.rows)
    setup_s = time.monotonic() - started

    with (
        LocalS3Server(fixture.s3_root, max_lifetime_s=600) as s3,
        DagsterDev({**env, "IDC_S3_ENDPOINT_URL": s3.endpoint_url}, cwd=tmp_path) as ui,
        sync_playwright() as pw,
    ):
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)  # fresh temporary profile
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        try:
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)  # expect() has its own 5 s default; CI machines are busy
            skip = page.get_by_role("button", name="Skip")  # first-visit "Join the Dagster community" dialog
            page.add_locator_handler(skip, lambda: skip.click())
            steps = Steps(page, artifacts)

            # -- the catalog: every asset, with its description and partition count --------------
            page.goto(ui.url + "/assets")
            for name in ("idc_index", "idc_collections", "collection_manifest", "downloaded_collection"):
                expect(page.locator(f'a[href="/assets/{name}"]').first).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("The series of one IDC collection to download").first).to_be_visible()
            expect(page.get_by_text(f"{len(all_collections)} partitions", exact=True)).to_have_count(2)
            steps.shot("catalog")

            # -- collection_manifest: description, owners, kinds, the latest manifest, its neighbours
            page.goto(ui.url + "/assets/collection_manifest")
            expect(page.get_by_text("The series of one IDC collection to download")).to_be_visible(timeout=WAIT_MS)
            row_count = page.get_by_text("Row count", exact=True).locator("xpath=..")
            expect(row_count).to_contain_text(f"{series:,}", timeout=WAIT_MS)  # the latest: qin_pet_phantom
            for text in (
                "imaging-data",
                "DuckDB",
                "Parquet",
                "domain: idc",
                "download_collections",
                MANIFEST_COLLECTION,
            ):
                expect(visible(page, text)).to_be_visible()
            expect(metadata_row(page, "series")).to_contain_text(str(series))
            expect(metadata_row(page, "preview")).to_contain_text("[Show Markdown]")  # too long to show inline
            upstream = page.get_by_text("Upstream assets", exact=True).locator("xpath=..")
            downstream = page.get_by_text("Downstream assets", exact=True).locator("xpath=..")
            expect(upstream).to_contain_text("idc_index")
            expect(downstream).to_contain_text("downloaded_collection")
            steps.shot("collection_manifest-overview")

            # -- lineage: idc_index -> it -> downloaded_collection, and its shards -> downloaded_collection --
            page.get_by_role("tab", name="Lineage").click()
            for name in ("idc_index", "collection_manifest", "downloaded_collection_shard", "downloaded_collection"):
                expect(page.locator(f'[data-tooltip="{name}"]').first).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("Latest event")).to_have_count(4)
            wanted = {
                ("idc_index", "collection_manifest"),
                ("collection_manifest", "downloaded_collection"),
                ("collection_manifest", "downloaded_collection_shard"),
            }
            deadline = time.monotonic() + 30  # the graph animates to its zoom level: measure until it settles
            while not wanted <= (edges := drawn_edges(page)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert wanted <= edges, edges
            assert ("idc_index", "downloaded_collection") not in edges, edges
            steps.shot("lineage-collection_manifest")

            # -- partitions of collection_manifest: one per collection of the installed index ----
            page.get_by_role("tab", name="Partitions").click()
            expect(page.get_by_text(f"{len(all_collections)} Partitions Selected")).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("Materialized (2)")).to_be_visible()
            expect(page.get_by_text(f"Missing ({len(all_collections) - 2})")).to_be_visible()
            expect(visible(page, all_collections[0])).to_be_visible()  # the list starts in order
            steps.shot("partitions")
            search = page.get_by_placeholder("Filter by name…")
            for collection in LISTED:
                assert collection in all_collections
                search.fill(collection)
                expect(visible(page, collection)).to_be_visible()
                if collection == "nlst":
                    steps.shot("partitions-filter-nlst")
            search.fill("no_such_collection")
            expect(visible(page, "nlst")).to_be_hidden()

            # -- the manifest of qin_pet_phantom: its metadata and preview ------------------------
            search.fill(MANIFEST_COLLECTION)
            visible(page, MANIFEST_COLLECTION).click()
            expect(page).to_have_url(re.compile(rf"partition={MANIFEST_COLLECTION}"))
            expect(page.get_by_text("View all historical events (1)")).to_be_visible(timeout=WAIT_MS)
            expected = {
                "series": str(series),
                "instances": str(instances),
                "size": size,
                "dagster/row_count": str(series),
                "modalities": "PT",
                "idc_release": "v25",
            }
            for key, value in expected.items():
                expect(metadata_row(page, key)).to_contain_text(value)
            expect(metadata_row(page, "manifest_path")).to_contain_text(f"{MANIFEST_COLLECTION}.parquet")
            steps.shot("partition-qin_pet_phantom-metadata")
            metadata_row(page, "preview").get_by_text("[Show Markdown]").click()
            preview = page.locator(".dagster-dialog").filter(has_text="preview")
            expect(preview.locator("table")).to_be_visible()
            for column in (
                "PatientID",
                "Modality",
                "SeriesInstanceUID",
                "instanceCount",
                "series_size_MB",
                "target_dir",
            ):
                expect(preview.locator("th", has_text=column)).to_be_visible()
            rows = preview.locator("tbody tr")
            expect(rows).to_have_count(min(10, series))
            expect(rows.first).to_contain_text(f"{MANIFEST_COLLECTION}/")
            expect(rows.first).to_contain_text(manifest["SeriesInstanceUID"][0].as_py())
            steps.shot("partition-qin_pet_phantom-preview")
            preview.get_by_role("button", name="Close").click()
            expect(preview).to_be_hidden()

            page.goto(ui.url + "/assets/idc_index")
            expect(page.get_by_text("The series-level index of NCI Imaging Data Commons")).to_be_visible(
                timeout=WAIT_MS
            )
            for text in ("imaging-data", "DuckDB", "Parquet", "refresh_idc_index", "idc_release_sensor"):
                expect(visible(page, text)).to_be_visible()
            expect(metadata_row(page, "idc_release")).to_contain_text("v25")
            expect(metadata_row(page, "collections")).to_contain_text(str(len(all_collections)))
            steps.shot("idc_index-overview")

            # -- launch downloaded_collection[rider_breast_mri] from the UI -----------------------
            page.goto(ui.url + "/assets/downloaded_collection")
            expect(page.get_by_text("Every DICOM file of the collection's manifest")).to_be_visible(timeout=WAIT_MS)
            for text in ("imaging-data", "dicom", "S3"):
                expect(visible(page, text)).to_be_visible()
            steps.shot("downloaded_collection-overview")
            run_id = launch_download(page, steps)
            expect(page.get_by_text(f"partition: {DOWNLOAD_COLLECTION}")).to_be_visible()
            expect(visible(page, "Success")).to_be_visible(timeout=150_000)
            expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible(timeout=WAIT_MS)
            steps.shot("run-success")
            run = ui.graphql(RUN_QUERY, {"id": run_id})["runOrError"]
            assert run["status"] == "SUCCESS", run
            assert {"key": "dagster/partition", "value": DOWNLOAD_COLLECTION} in run["tags"], run["tags"]

            # -- the downloaded partition's metadata in the UI matches the disk -------------------
            page.goto(ui.url + f"/assets/downloaded_collection?view=partitions&partition={DOWNLOAD_COLLECTION}")
            expect(page.get_by_text("Materialized (1)")).to_be_visible(timeout=WAIT_MS)
            for key, value in {
                "series": "3",
                "series_complete": "3",
                "series_failed": "0",
                "files": str(files_expected),
            }.items():
                expect(metadata_row(page, key)).to_contain_text(value)
            expect(metadata_row(page, "download_path")).to_contain_text(str(download_dir / DOWNLOAD_COLLECTION))
            steps.shot("downloaded_collection-partition-metadata")
            page.get_by_role("tab", name="Checks").click()
            checks = page.get_by_text("Checks (4)").locator("xpath=../..")
            names = ("files_match_manifest", "dicom_headers_match_manifest", "no_stray_files", "licences_allow_any_use")
            for check in names:
                expect(visible(page, check)).to_be_visible(timeout=WAIT_MS)
            expect(checks.get_by_text("Succeeded", exact=True)).to_have_count(4, timeout=WAIT_MS)
            steps.shot("downloaded_collection-checks")
            files_after_success, gets_after_success = len(list(download_dir.rglob("*.dcm"))), s3.stats["get_object"]

            # -- terminate a download from the UI: the run stops, s5cmd with it, no half file stays
            shutil.rmtree(download_dir / DOWNLOAD_COLLECTION)
            s3.faults.throttle_bytes_per_s = 10  # every object (~1.5 KB) now takes minutes
            page.goto(ui.url + "/assets/downloaded_collection")
            expect(page.get_by_text("Every DICOM file of the collection's manifest")).to_be_visible(timeout=WAIT_MS)
            stopped_run = launch_download(page)
            deadline = time.monotonic() + 120
            while not (s5cmd_pids := processes_mentioning(str(download_dir))):
                assert time.monotonic() < deadline, "s5cmd never started"
                time.sleep(0.5)
            expect(page.get_by_text("progress:").first).to_be_visible(timeout=WAIT_MS)  # transferring
            page.get_by_role("button", name="Terminate").first.click()
            confirm = page.locator(".dagster-dialog").filter(has_text="Terminate runs")
            expect(confirm.get_by_text("1 run will be terminated")).to_be_visible()
            steps.shot("terminate-dialog")
            confirm.get_by_role("button", name="Terminate 1 run").click()
            expect(visible(page, "Canceled")).to_be_visible(timeout=WAIT_MS)
            steps.shot("run-terminated")
            deadline = time.monotonic() + 60  # the page can show "Canceled" a moment before the run's status
            while (status := ui.graphql(RUN_QUERY, {"id": stopped_run})["runOrError"]["status"]) == "CANCELING":
                assert time.monotonic() < deadline, "the run stayed CANCELING"
                time.sleep(0.5)
            assert status == "CANCELED"
            deadline = time.monotonic() + 15
            while processes_mentioning(str(download_dir)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert processes_mentioning(str(download_dir)) == [], f"s5cmd {s5cmd_pids} outlived its run"
            sizes = {
                key.split("/")[-1]: (fixture.s3_root / row["aws_bucket"] / key).stat().st_size
                for row in fixture.rows
                for key in fixture.object_keys(row)
            }
            for path in download_dir.rglob("*.dcm"):  # what was cut short is not at a final path
                assert path.stat().st_size == sizes[path.name], path
        except BaseException:  # evidence for CI: what the browser showed, and the server's log
            (artifacts / "dagster-dev.log").write_text(ui.log_tail(200_000))
            with contextlib.suppress(Exception):  # a dead browser must not hide the real error
                page.screenshot(path=artifacts / "failure.png", full_page=True)
            raise
        finally:
            browser.close()
        runs = ui.graphql(RUNS_QUERY)["runsOrError"]["results"]

    assert files_after_success == files_expected and gets_after_success == files_expected
    assert {"runId": run_id, "status": "SUCCESS"} in runs and {"runId": stopped_run, "status": "CANCELED"} in runs, runs
    assert not [r for r in runs if r["status"] == "FAILURE"], runs  # e.g. nothing a sensor launched failed
    assert processes_mentioning(str(home)) == [] and processes_mentioning(str(download_dir)) == []
    print(
        f"\nUI test: setup {setup_s:.0f} s, server start {ui.startup_s:.0f} s, server stop {ui.stop_s:.0f} s, "
        f"total {time.monotonic() - started:.0f} s; screenshots: {', '.join(p.name for p in steps.paths)}"
    )
