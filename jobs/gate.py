# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: gate
# MAGIC The metric gate: thresholds and beat-the-champion; a pass registers the version and aliases it `challenger`. Widgets: `model_uri`, `model_name`, `data_version`, `continue_on_fail` (`true`: a failed gate is an outcome the job's condition task reads, not a failure). Task values: `passed`, `message`, `model_version`.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision gate` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("gate")
