"""What every run uses: the resources (keys ``idc``, ``duckdb``, ``s5cmd``) and the executor
(``$DAGSTER_EXECUTOR``, in-process by default)."""

import dagster as dg

from dataset_assets import settings
from dataset_assets.lib.executors import executor_from_env
from dataset_assets.lib.resources import IdcResource, IndexDatabase, S5cmdResource

defs = dg.Definitions(
    executor=executor_from_env(),
    resources={
        "idc": IdcResource(),
        "duckdb": IndexDatabase(database=settings.IDC_DUCKDB_PATH.require()),
        "s5cmd": S5cmdResource(),
    },
)
