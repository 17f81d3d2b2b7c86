# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision quickstart
# MAGIC
# MAGIC The whole path from raw COCO data to a scored model in one notebook:
# MAGIC
# MAGIC 1. **Data**: a COCO annotation file and its image folder, or (when none is given) the synthetic
# MAGIC    shapes dataset with one bad record of every kind, so the quarantine has something to show.
# MAGIC 2. **Ingest** into Delta: silver `images`, `annotations`, `categories`, the `quarantine` and the
# MAGIC    gold `samples` table with its train/val/test split.
# MAGIC 3. **Train** a torchvision model with Ray Train, logged to MLflow.
# MAGIC 4. **Evaluate** it on the gold test split with COCO metrics.
# MAGIC
# MAGIC The same notebook runs on Databricks (Unity Catalog tables, the cluster's Spark) and on a laptop
# MAGIC (`python notebooks/01_quickstart.py`: Sail, Delta folders and a sqlite MLflow under `root`).
# MAGIC Parameters are widgets, or `LAKEVISION_WIDGET_<NAME>` environment variables locally. The `%pip`
# MAGIC cell installs the bundle's package from the folder above this notebook (skip it where the wheel is
# MAGIC a cluster library); locally it is a comment.

# COMMAND ----------

# MAGIC %pip install --quiet ..

# COMMAND ----------

# MAGIC %md
# MAGIC ## Configuration and runtime
# MAGIC `target` picks the tables' catalog and schema from `bundle/config/targets.yaml`; `profile` lays a
# MAGIC partial config over the files (`cpu` for a laptop, or the path of a YAML file).

# COMMAND ----------

from lakevision.bundle.task_context import widget
from lakevision.config import load_config
from lakevision.runtime import get_runtime

cfg = load_config(widget("config_dir") or None, widget("target", "local"), profile=widget("profile") or None)
rt = get_runtime(cfg, widget("root") or None)  # empty: $LAKEVISION_ROOT or .lakevision

# COMMAND ----------

# MAGIC %md
# MAGIC ## 1. Data
# MAGIC With `annotations` and `images` empty, the sample dataset is written to the runtime's storage
# MAGIC (`<root>/sample` locally, the Unity Catalog volume on Databricks). The same arguments always give
# MAGIC the same files, so running the notebook again ingests nothing new.

# COMMAND ----------

from lakevision.data.synthetic import DEFECT_CODES, generate_dataset

annotations, images = widget("annotations"), widget("images")
if not annotations:
    sample = generate_dataset(rt.storage("sample"), num_images=int(widget("sample_images", "300")),
                              defects={code: 1 for code in DEFECT_CODES})
    annotations, images = str(sample.annotation_file), str(sample.image_dir)
print(f"annotations: {annotations}\nimages:      {images}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 2. Ingest into Delta
# MAGIC Every bad record lands in `quarantine` with one reason code; every good one is kept. Writes are
# MAGIC `MERGE INTO`, so the versions below only move when the data changed.

# COMMAND ----------

import pandas as pd

from lakevision.data.ingest import run_ingest

ingest = run_ingest(rt, annotations, images)
print(f"ingest run {ingest.run_id}")
print(pd.DataFrame(ingest.tables).T[["version", "rows", "location"]].to_string())
print("quarantined by reason:", ingest.quarantine_by_reason)

# COMMAND ----------

# MAGIC %md
# MAGIC ## 3. Train
# MAGIC `task` is `classification`, `detection` or `segmentation` (empty: `training.task` of the config).
# MAGIC Ray Train runs on Ray-on-Spark on a Databricks GPU cluster and on local Ray elsewhere.

# COMMAND ----------

from lakevision.training.train import run_training

trained = run_training(rt, widget("task") or None)
print(f"MLflow run {trained['run_id']}\nmodel {trained['model_uri']}")
print(f"best {trained['best_metric']['name']} = {trained['best_metric']['value']}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 4. Evaluate
# MAGIC The model on the gold test split at the same data version; metrics, figures and a report go
# MAGIC into the model's MLflow run, per-image predictions into the `predictions` table.

# COMMAND ----------

from lakevision.evaluation.evaluate import run_evaluation

evaluation = run_evaluation(rt, trained["model_uri"], data_version=trained["data_version"])
print(f"{evaluation['task']} on {evaluation['images']} test images (data version {evaluation['data_version']})")
print(pd.Series(evaluation["metrics"], name="test").round(4).to_string())

# COMMAND ----------

# MAGIC %md
# MAGIC Next: `02_explore_data` looks at the tables, `05_deploy_and_query` serves the model.

# COMMAND ----------

rt.stop()
