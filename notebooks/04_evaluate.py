# Databricks notebook source
# MAGIC %md
# MAGIC # Evaluate
# MAGIC
# MAGIC Scores a logged model on the gold test split with COCO-exact metrics (accuracy and F1 for
# MAGIC classification). Metrics, a precision-recall curve or confusion matrix, sample and worst-error
# MAGIC figures and a report go into the model's MLflow run; per-image predictions go to the
# MAGIC `predictions` Delta table.
# MAGIC
# MAGIC Widgets: `model_uri` (`models:/m-...`, `runs:/RUN/model`, `models:/name@champion`; empty: the
# MAGIC model of the latest finished training run of `task`), `task` (empty: the config's
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
# MAGIC ## The model
# MAGIC The train job tags each finished run with its task and model URI; without a `model_uri` the
# MAGIC run of the task with the best validation metric is evaluated (the one deploy would pick).

# COMMAND ----------

from lakevision.tasks import configured_kind
from lakevision.tracking import best_training_run, mlflow_client

task, kind = configured_kind(cfg.training, widget("task") or None)
best = best_training_run(mlflow_client(rt.tracking_uri), rt.experiment_name, task, kind)
model_uri = widget("model_uri") or best["model_uri"]
print(f"model {model_uri}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Evaluate
# MAGIC Detection and Mask R-CNN models see the original images and are scored against the original
# MAGIC COCO ground truth, crowd regions and area ranges included.

# COMMAND ----------

import pandas as pd

from lakevision.evaluation.evaluate import run_evaluation

data_version = widget("data_version")
result = run_evaluation(rt, model_uri, widget("task") or None, int(data_version) if data_version else None)
print(f"{result.task} model on {result.images} test images (data version {result.data_version}), "
      f"logged to MLflow run {result.run_id}")
print(pd.Series(result.metrics, name="test").round(4).to_string())
print(f"per-image predictions: {result.predictions_table['location']} version {result.predictions_table['version']}")

# COMMAND ----------

rt.stop()
