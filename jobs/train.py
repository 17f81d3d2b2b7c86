# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: train
# MAGIC Ray-on-Spark and Ray Train fit a torchvision model on the gold table; everything goes to MLflow. Widgets: `task`, `data_version`, `set` (config overrides, one per line). Task values: `model_uri`, `run_id`, `data_version`, `best_metric`, `best_value`.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision train` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("train")
