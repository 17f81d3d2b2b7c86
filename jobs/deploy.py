# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: deploy
# MAGIC Gate, register, canary on the Model Serving endpoint through the Databricks SDK, then promote or roll back. Widgets: `model_uri` (empty: the experiment's best run), `model_name`, `endpoint`, `traffic`, `task`. Task values: `status`, `endpoint`, `champion_version`. Fails the task unless the new version serves.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision deploy` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("deploy")
