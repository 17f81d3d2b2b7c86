"""An interactive notebook's configuration: the same target, config and names its bundle's jobs use.

The notebooks in ``notebooks/`` run on a workspace (from the folder ``databricks bundle deploy``
synced them to) and on a laptop (``python notebooks/01_quickstart.py`` in a checkout). Neither has
a job cluster's environment, so :func:`notebook_config` rebuilds it from the bundle.
"""

from __future__ import annotations

import os
from pathlib import Path

from lakevision.bundle.task_context import deployed_target, find_bundle_root, widget
from lakevision.config import CONFIG_DIR_ENV, TARGET_ENV, LakevisionConfig, load_config


def _workspace_user() -> str | None:
    """The notebook's user on Databricks (whose dev_<user>_ names a development copy has)."""
    if "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        return None
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession().sql("SELECT current_user()").first()[0]


def bundle_environment(bundle_root: Path, target: str) -> dict[str, str]:
    """The environment the bundle's job clusters give every lakevision task of ``target``: its
    config folder and the deployed resources' names, development presets applied."""
    from lakevision.bundle.loader import load_bundle

    bundle = load_bundle(bundle_root, target, local_files=True, user=_workspace_user())
    for job in (bundle.resources.get("jobs") or {}).values():
        for cluster in job.get("job_clusters") or []:
            env = (cluster.get("new_cluster") or {}).get("spark_env_vars")
            if env:
                return {k: str(v) for k, v in env.items()}
    return {}


def notebook_config(read=widget) -> LakevisionConfig:
    """The configuration of an interactive notebook, wherever it was opened.

    On a job cluster the bundle's environment already names the target, config and Unity Catalog
    names. Opened by hand, in a deployed bundle folder on the workspace or in a checkout, the
    notebook finds its bundle above its own folder, takes the target from the folder the bundle
    was deployed to (``local`` in a checkout) and the names from the bundle itself, as its jobs
    see them. The widgets ``target``, ``config_dir`` and ``profile`` override."""
    root = find_bundle_root()
    target = read("target", "") or os.environ.get(TARGET_ENV) or (root and deployed_target(root)) or "local"
    if root is not None and TARGET_ENV not in os.environ:
        for key, value in bundle_environment(root, target).items():
            os.environ.setdefault(key, value)
    config_dir = read("config_dir", "") or os.environ.get(CONFIG_DIR_ENV)
    return load_config(config_dir or None, target, profile=read("profile", "") or None)
