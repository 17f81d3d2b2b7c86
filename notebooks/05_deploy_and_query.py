# Databricks notebook source
# MAGIC %md
# MAGIC # Deploy and query
# MAGIC
# MAGIC The deploy job, then one request to the endpoint as a client would send it:
# MAGIC
# MAGIC 1. **Deploy**: the experiment's best training run of `task` (or `model_uri`) goes through the
# MAGIC    metric gate, is registered, and is served on a Model Serving endpoint through the Databricks
# MAGIC    SDK: created with all traffic, or updated as a canary, smoke-tested, then promoted to 100% and
# MAGIC    aliased `champion`, or rolled back.
# MAGIC 2. **Query**: a base64 image through the SDK's `serving_endpoints.query`.
# MAGIC
# MAGIC Locally the "workspace" is `lakevision workspace`, an HTTP stand-in for Model Serving started for
# MAGIC each step; its endpoints are kept under the root, so a restart serves the same versions.
# MAGIC
# MAGIC Widgets: `task`, `model_uri`, `model_name`, `endpoint` (empty: the config's), `traffic` (canary
# MAGIC share in percent; empty: `canary.traffic_percentage`), `image` (a file; empty: the first test image).
# MAGIC The `%pip` cell installs the wheel the bundle deployed (Databricks); locally it is a comment.

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
# MAGIC ## 1. Deploy
# MAGIC The gate's bounds are `deployment.metrics_threshold`; a model that fails them is not registered
# MAGIC and the endpoint is left as it was.

# COMMAND ----------

from lakevision.serving.model_server import DeploymentError
from lakevision.serving.pipeline import run_deployment

traffic = widget("traffic")
report = run_deployment(rt, model_name=widget("model_name") or None, endpoint=widget("endpoint") or None,
                        traffic_percentage=int(traffic) if traffic else None,
                        model_uri=widget("model_uri") or None, task=widget("task") or None)
if "best_run" in report:
    print(f"best run {report['best_run']['run_id']}: {report['best_run']['metric']} = {report['best_run']['value']}")
print(report["gate"]["message"])
deployment = report.get("deployment") or {}
print(f"deployment {report['status']}: {deployment.get('action')}, traffic steps {deployment.get('steps')}, "
      f"problems {(deployment.get('smoke') or {}).get('problems') or []}")
if report["status"] != "deployed":
    raise DeploymentError(f"{report['model_name']} was not deployed to {report['endpoint']}: {report['status']}")
state = report["endpoint_state"]
print(f"champion {report['model_name']} version {report['champion']['version']} "
      f"(previous: {report['champion']['previous']})")
print(f"endpoint {state['name']}: {state['state']['ready']}, routes {state['routes']}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 2. Query
# MAGIC Callers send the image file's bytes, base64-encoded, in the `image` column; the model answers with
# MAGIC boxes in original pixels, COCO category ids and names, and scores. The client retries for up to
# MAGIC two minutes while the endpoint is not ready: a restarted local workspace reloads its models first,
# MAGIC and a Databricks endpoint that scaled to zero has to wake up.

# COMMAND ----------

from pathlib import Path

import pandas as pd

from lakevision.packaging.wire import encode_image
from lakevision.serving.client import workspace_connection
from lakevision.serving.model_server import ModelServer
from lakevision.data.samples import load_split

image_path = widget("image") or load_split(rt, "test").image_paths[0]
with workspace_connection(rt) as (url, token):
    server = ModelServer(url, token, report["model_name"], retry_timeout_seconds=120)
    predictions, served_by = server.query(report["endpoint"], [encode_image(Path(image_path).read_bytes())])
answer = predictions[0]
print(f"{served_by} answered for {image_path}")
if "boxes" in answer:  # detection and Mask R-CNN; classification answers with one label
    print(f"{len(answer['boxes'])} objects, the first 10:")
    detections = pd.DataFrame({"category": answer["categories"], "score": answer["scores"],
                               "box (x0, y0, x1, y1)": [[round(c, 1) for c in b] for b in answer["boxes"]]})
    print(detections.head(10).round(3).to_string())
else:
    print({k: v for k, v in answer.items() if k != "masks"})

# COMMAND ----------

rt.stop()
