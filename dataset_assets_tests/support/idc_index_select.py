"""Run by the python of ``.venv-idc-index`` (idc-index 0.13.4): which series idc-index would
download for each selection, as the crdc_series_uuids of the s5cmd manifest it writes.

    python idc_index_select.py '[{"collection_id": "qin_lung_ct", "analysis_results": "only"}, ...]'

Each selection is ``IDCClient.download_from_selection`` keyword arguments (or
``{"get_viewer_URL": {...}}``: the viewer link idc-index gives); its s5cmd run is
replaced by reading the manifest it was handed (nothing is fetched) and its disk-space check by
nothing. Prints one JSON list: per selection, the sorted crdc_series_uuids, or the error text
idc-index raised. Any connection to a non-loopback address is refused."""

import json
import re
import socket
import sys
import tempfile


class Guarded(socket.socket):
    def connect(self, address):
        if self.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test guard: blocked a connection to {address}")
        return super().connect(address)


socket.socket = Guarded  # before anything that could open a socket is imported

from idc_index import index as idx  # noqa: E402

client = idx.IDCClient()
captured: list[str] = []


def read_manifest(self, endpoint_to_use, manifest_file, *args, **kwargs):
    with open(manifest_file) as handle:
        captured.extend(re.findall(r"s3://[^/\s]+/([0-9a-f-]{36})/\*", handle.read()))


client._s5cmd_run = read_manifest.__get__(client)
client._validate_disk_space = lambda *args, **kwargs: None
results = []
for selection in json.loads(sys.argv[1]):
    if "get_viewer_URL" in selection:  # a viewer link instead: get_viewer_URL's keyword arguments
        results.append(client.get_viewer_URL(**selection["get_viewer_URL"]))
        continue
    captured.clear()
    with tempfile.TemporaryDirectory() as dest:
        try:
            client.download_from_selection(downloadDir=dest, quiet=True, show_progress_bar=False, **selection)
            results.append(sorted(set(captured)))
        except Exception as exc:  # what idc-index says instead
            results.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(results))
