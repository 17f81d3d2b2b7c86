# Databricks notebook source
# MAGIC %md
# MAGIC # Explore the ingested data
# MAGIC
# MAGIC What the ingest job wrote, read back from the Delta tables: the gold `samples` per split and
# MAGIC category, the `quarantine` by reason, the lineage of ingest runs, and a grid of images with their
# MAGIC ground-truth boxes. Run `01_quickstart` (or the ingest job) first. The `%pip` cell installs the
# MAGIC wheel the bundle deployed (Databricks); locally it is a comment.

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
# MAGIC ## The gold table
# MAGIC One row per valid image with its annotations nested. The split comes from a hash of the image id,
# MAGIC so it stays the same when images are added later.

# COMMAND ----------

from pyspark.sql import functions as F

from lakevision import delta

ref = rt.table("samples")
version = delta.table_version(rt.spark, ref)
samples = delta.read_table(rt.spark, ref, version)
print(f"samples ({ref.location}) at version {version}")
samples.groupBy("split").agg(F.count("*").alias("images"), F.sum("num_annotations").alias("objects")) \
    .orderBy("split").show()

# COMMAND ----------

objects = samples.select("split", F.explode("annotations").alias("a"))
objects.groupBy(F.col("a.category_name").alias("category"), "split").count().orderBy("category", "split").show()

# COMMAND ----------

# MAGIC %md
# MAGIC ## Quarantine and lineage
# MAGIC Each rejected record has exactly one reason code; `ingest_runs` records every table's version
# MAGIC after each ingest run, so a training run can name the exact data it saw.

# COMMAND ----------

quarantine = delta.read_table(rt.spark, rt.table("quarantine"))
quarantine.groupBy("record_kind", "reason").count().orderBy("record_kind", "reason").show(truncate=False)
quarantine.select("record_kind", "record_id", "reason", "detail").orderBy("record_kind", "record_id") \
    .show(5, truncate=70)

# COMMAND ----------

delta.read_table(rt.spark, rt.table("ingest_runs")) \
    .select("finished_at", "run_id", "table_name", "version", "rows").orderBy("finished_at", "table_name") \
    .show(truncate=False)

# COMMAND ----------

# MAGIC %md
# MAGIC ## Images with their boxes
# MAGIC The image paths and annotations come from the `samples` table (training's own reader); the grid
# MAGIC is drawn by the same code as the evaluation figures. Locally the figure is saved under the
# MAGIC root; on Databricks it goes to the volume and is shown below.

# COMMAND ----------

from lakevision.evaluation.evaluate import ground_truth, image_grid
from lakevision.data.samples import load_split

split = widget("split", "train")
records = load_split(rt, split)
boxes = ground_truth(records, with_masks=False)
names = dict(zip(records.category_ids, records.category_names))
fig = image_grid(records, boxes, [None] * len(boxes), list(range(len(boxes))), names,
                 f"{split} images at samples version {records.version}")
figure_path = rt.storage("figures") / f"{split}_samples.png"
figure_path.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(figure_path)
print(f"figure: {figure_path}")
if rt.kind == "databricks":
    from databricks.sdk.runtime import display

    display(fig)

# COMMAND ----------

rt.stop()
