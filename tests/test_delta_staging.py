"""A merge stages its changed rows for Spark and removes them afterwards: the evaluate job's
predictions went through ``<root>/staging`` on every run and stayed there."""

from __future__ import annotations

import pandas as pd

from lakevision import delta


def test_upsert_leaves_nothing_in_staging(runtime):
    spark, staging = runtime.spark, runtime.staging_dir
    staging.mkdir(parents=True)
    ref = runtime.table("merged")
    frame = pd.DataFrame({"id": [1, 2], "row_hash": ["a", "b"], "value": [10, 20]})
    assert delta.upsert(spark, spark.createDataFrame(frame), ref, ["id"], ["row_hash"], staging) == 2
    changed = pd.DataFrame({"id": [2, 3], "row_hash": ["b2", "c"], "value": [21, 30]})
    assert delta.upsert(spark, spark.createDataFrame(changed), ref, ["id"], ["row_hash"], staging) == 2
    assert delta.upsert(spark, spark.createDataFrame(changed), ref, ["id"], ["row_hash"], staging) == 0
    assert sorted(delta.read_table(spark, ref).toPandas()["value"]) == [10, 21, 30]
    assert list(staging.iterdir()) == []
