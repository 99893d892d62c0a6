"""Case 6 of download_bench.py, run by the python of a separate venv that has idc-index installed.

    python idc_index_runner.py '{"endpoint": URL, "index": PARQUET, "dests": [DIR, ...], "s5cmd": EXE,
                                 "series": [UID, ...]}'

Times ``IDCClient.download_from_selection`` of the given series into each destination and prints
``RESULT {"init_s": ..., "times": [...]}``. The client gets the fixture's index rows (buckets and
sizes as the loopback server has them), the loopback endpoint (idc-index's module-level
``aws_endpoint_url``) and an s5cmd wrapper fixing ``--numworkers``; any Python connection to a
non-loopback address is refused.
"""

import json
import socket
import sys
import time

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Guarded(socket.socket):
    def _check(self, address):
        if self.family != socket.AF_UNIX and address[0] not in LOOPBACK:
            raise OSError(f"benchmark guard: blocked a connection to {address}")

    def connect(self, address):
        self._check(address)
        return super().connect(address)

    def connect_ex(self, address):
        self._check(address)
        return super().connect_ex(address)


socket.socket = Guarded  # before anything that could open a socket is imported

import pandas as pd  # noqa: E402
from idc_index import index as idx  # noqa: E402

cfg = json.loads(sys.argv[1])
assert cfg["endpoint"].startswith("http://127.0.0.1:"), cfg["endpoint"]
idx.aws_endpoint_url = cfg["endpoint"]  # the endpoint of source_bucket_location="aws"
started = time.monotonic()
client = idx.IDCClient()
init_s = time.monotonic() - started
client.index = pd.read_parquet(cfg["index"])
client.s5cmdPath = cfg["s5cmd"]
times = []
for dest in cfg["dests"]:
    started = time.monotonic()
    client.download_from_selection(downloadDir=dest, seriesInstanceUID=cfg["series"], quiet=True)
    times.append(time.monotonic() - started)
print("RESULT " + json.dumps({"init_s": init_s, "times": times}))
