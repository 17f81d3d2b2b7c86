# Databricks notebook source
# MAGIC %md
# MAGIC # lakevision job step: monitor
# MAGIC Endpoint health, latency and errors from the inference table, input drift, retraining. Widgets: `endpoint`, `retrain_job`, `no_retrain`. Task values: `healthy`, `problems`, `retrain`, `reasons`, `triggered`. Fails the task when the endpoint is unhealthy, so the job's failure emails go out.
# MAGIC
# MAGIC A job task runs this notebook with the lakevision wheel installed as a task library; the step's
# MAGIC options are the widgets of the same name, and its result is published as task values (only a
# MAGIC notebook task can publish them). `lakevision monitor` runs the same step from a shell.

# COMMAND ----------

from lakevision.jobs.notebook import run_notebook_step

run_notebook_step("monitor")
