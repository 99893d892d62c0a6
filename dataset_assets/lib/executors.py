"""The executor, chosen by ``DAGSTER_EXECUTOR`` so a team can move steps onto Dagster's own
distributed executors without editing code:

* ``in_process`` (default): all steps of a run in one process, the run worker. A run here is one
  partition of a chain of cheap steps around one download, so a process per step only adds
  start-up (Dagster and the definitions imported again: ~2 s a step, 15 s instead of 7.5 s for
  a collection's manifest, download and checks); the download itself is parallel in s5cmd;
* ``multiprocess``: each step in a subprocess on the run's host;
* ``celery``: steps as Celery tasks (``pip install dagster-celery``; broker from the run config);
* ``k8s``: each step in its own Kubernetes job (``pip install dagster-k8s``);
* ``docker``: each step in its own container (``pip install dagster-docker``).

Run launchers (one pod or container per run) are instance settings instead: see
``dataset_assets/deploy/``.
"""

import importlib

import dagster as dg

from dataset_assets import settings

DISTRIBUTED = {
    "celery": ("dagster_celery", "celery_executor"),
    "k8s": ("dagster_k8s", "k8s_job_executor"),
    "docker": ("dagster_docker", "docker_executor"),
}


def executor_from_env() -> dg.ExecutorDefinition:
    name = settings.DAGSTER_EXECUTOR.require().strip().lower()
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "in_process":
        return dg.in_process_executor
    if name not in DISTRIBUTED:
        raise ValueError(f"DAGSTER_EXECUTOR={name!r} is not one of multiprocess, in_process, {', '.join(DISTRIBUTED)}")
    module, attribute = DISTRIBUTED[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        package = module.replace("_", "-")
        raise ImportError(f"DAGSTER_EXECUTOR={name} needs the {package} package: pip install {package}") from exc
