# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision quickstart
# MAGIC
# MAGIC Raw COCO data into Delta tables, the first step of everything else:
# MAGIC
# MAGIC 1. **Data**: a COCO annotation file and its image folder, or (when none is given) the synthetic
# MAGIC    shapes dataset with one bad record of every kind, so the quarantine has something to show.
# MAGIC 2. **Ingest** into Delta: silver `images`, `annotations`, `categories`, the `quarantine` and the
# MAGIC    gold `samples` table with its train/val/test split.
# MAGIC
# MAGIC Then `02_explore_data` looks at the tables, `03_train` trains a model, `04_evaluate` scores it and
# MAGIC `05_deploy_and_query` serves it. The bundle's `cv_pipeline` job runs all of it on a schedule.
# MAGIC
# MAGIC The same notebook runs on Databricks (Unity Catalog tables, the cluster's Spark) and on a laptop
# MAGIC (`python notebooks/01_quickstart.py`: Sail, Delta folders and a sqlite MLflow under `root`).
# MAGIC Parameters are widgets, or `LAKEVISION_WIDGET_<NAME>` environment variables locally. The `%pip`
# MAGIC cell installs the wheel `databricks bundle deploy` uploaded next to the synced files (nothing is
# MAGIC built inside /Workspace); locally it is a comment. Target, config and table names are the
# MAGIC bundle's: the target of the folder it was deployed to, `local` in a checkout.

# COMMAND ----------

# MAGIC %pip install --quiet ../../artifacts/.internal/lakevision-0.1.0-py3-none-any.whl

# COMMAND ----------

# MAGIC %md
# MAGIC ## Configuration and runtime
# MAGIC `target` picks the tables' catalog and schema from `bundle/config/targets.yaml`; `profile` lays a
# MAGIC partial config over the files (`cpu` for a laptop, or the path of a YAML file).

# COMMAND ----------

from lakevision.bundle.task_context import widget
from lakevision.notebook_setup import notebook_config
from lakevision.runtime import get_runtime

cfg = notebook_config()  # the target and names of the bundle this notebook belongs to
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
# MAGIC Next: `02_explore_data` looks at these tables, `03_train` trains on the gold split.

# COMMAND ----------

rt.stop()
