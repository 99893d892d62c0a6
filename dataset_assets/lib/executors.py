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

A value that cannot be used (a typo, or a distributed executor whose package is not installed)
never takes the code location down: it is logged in one line at load, and every run fails at
its start with that line, rather than running its steps somewhere the team did not choose.
"""

import importlib
import logging

import dagster as dg

from dataset_assets import settings

logger = logging.getLogger(__name__)

DISTRIBUTED = {
    "celery": ("dagster_celery", "celery_executor"),
    "k8s": ("dagster_k8s", "k8s_job_executor"),
    "docker": ("dagster_docker", "docker_executor"),
}


class ExecutorSettingError(Exception):
    """``DAGSTER_EXECUTOR`` names an executor this installation cannot provide."""


def executor_problem(name: str) -> tuple[dg.ExecutorDefinition | None, str | None]:
    """``(executor, None)`` for ``name``, or ``(None, one-line reason)``."""
    name = name.strip().lower()
    if name == "multiprocess":
        return dg.multiprocess_executor, None
    if name == "in_process":
        return dg.in_process_executor, None
    if name not in DISTRIBUTED:
        choices = ", ".join(["in_process", "multiprocess", *DISTRIBUTED])
        return None, f"DAGSTER_EXECUTOR={name!r} is not one of {choices}"
    module, attribute = DISTRIBUTED[name]
    try:
        return getattr(importlib.import_module(module), attribute), None
    except ImportError:
        package = module.replace("_", "-")
        return None, f"DAGSTER_EXECUTOR={name} needs the {package} package: pip install {package}"


def _refusing(problem: str) -> dg.ExecutorDefinition:
    @dg.executor(name="unusable_executor")
    def refuse(_init_context):
        raise ExecutorSettingError(problem)

    return refuse


def executor_from_env() -> dg.ExecutorDefinition:
    executor, problem = executor_problem(settings.DAGSTER_EXECUTOR.require())
    if executor is not None:
        return executor
    logger.warning("%s; every run will fail until it is set right", problem)
    return _refusing(problem)
