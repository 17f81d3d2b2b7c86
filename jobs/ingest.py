# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: ingest
# MAGIC COCO annotations and images into the Delta tables: silver `images`, `annotations`, `categories`, the `quarantine` with a reason per bad record, and the gold `samples` table. Widgets: `annotations`, `images`. Task values: `samples_version`, `table_versions`, `quarantined`.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision ingest` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("ingest")
