# Databricks notebook source
# MAGIC %md
# MAGIC # Train
# MAGIC
# MAGIC Trains the torchvision model of one task on the gold `samples` table with Ray Train and PyTorch
# MAGIC Lightning (Ray-on-Spark on a Databricks GPU cluster, local Ray elsewhere) and logs one MLflow run:
# MAGIC parameters, the dataset version, per-epoch metrics and the packaged serving model.
# MAGIC
# MAGIC Widgets: `task` (`classification`, `detection` or `segmentation`; empty: the config's
# MAGIC `training.task`), `data_version` (empty: latest). The `%pip` cell installs the wheel the bundle
# MAGIC deployed (Databricks); locally it is a comment.

# COMMAND ----------

# MAGIC %pip install --quiet ../../artifacts/.internal/lakevision-0.1.0-py3-none-any.whl

# COMMAND ----------

from lakevision.bundle.task_context import widget
from lakevision.notebook_setup import notebook_config
from lakevision.runtime import get_runtime

cfg = notebook_config()  # the target and names of the bundle this notebook belongs to
rt = get_runtime(cfg, widget("root") or None)  # empty: $LAKEVISION_ROOT or .lakevision

# COMMAND ----------

# MAGIC %md
# MAGIC ## Train
# MAGIC The driver reads the train and val splits at one Delta version into plain records, so the Ray
# MAGIC workers never need Spark. Model sizes, epochs and workers come from `training_config.yaml` and
# MAGIC the `profile`.

# COMMAND ----------

from lakevision.training.train import run_training

data_version = widget("data_version")
result = run_training(rt, widget("task") or None, int(data_version) if data_version else None)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Result
# MAGIC The model URI is what `04_evaluate`, the gate and the deployment take. In a job the run id and
# MAGIC model URI are also published as task values for the tasks downstream.

# COMMAND ----------

import pandas as pd

from lakevision.bundle.task_context import set_task_values

print(f"MLflow run {result.run_id}\nmodel {result.model_uri}")
print(f"{result.task} / {result.architecture} on {result.data_table} version {result.data_version}")
print(f"best {result.best_metric['name']} = {result.best_metric['value']}")
print(pd.Series(result.metrics, name="last epoch").round(4).to_string())
set_task_values(run_id=result.run_id, model_uri=result.model_uri)

# COMMAND ----------

rt.stop()
