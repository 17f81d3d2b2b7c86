# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: score
# MAGIC A model version (default the registered model's champion) over a Delta table of images (default the `images` silver table) on the Spark workers, merged into the scores table: one row per image and model version, with the prediction in the serving response's format or an `error`. Only images without a row for that version are scored. Widgets: `model`, `model_name`, `input_table`, `input_version`, `id_column`, `path_column`, `output_table`, `partitions`, `retry_errors`. Task values: `model_uri`, `model_version`, `scored`, `errors`, `skipped`, `output_table`, `output_version`.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision score` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("score")
