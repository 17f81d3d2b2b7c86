# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: evaluate
# MAGIC COCO-exact metrics and plots of a logged model on the gold test split, logged to its MLflow run. Widgets: `model_uri` (empty: the champion of `model_name`), `model_name`, `task`, `data_version`. Task values: `run_id`, `data_version`, `metrics`.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision evaluate` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("evaluate")
