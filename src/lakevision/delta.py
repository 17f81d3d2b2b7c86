"""Delta table operations written once for Sail, Databricks classic and Databricks serverless.

Reads and writes go through ``format("delta")`` and SQL ``MERGE INTO``, which every engine we run
on supports. The one thing Sail lacks is table history, so :func:`table_version` asks delta-rs
for local tables and ``DESCRIBE HISTORY`` for Unity Catalog ones.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lakevision.errors import LakevisionError
from lakevision.runtime import TableRef

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession


class SchemaDriftError(LakevisionError, RuntimeError):
    """A write left the table with other columns than the data had (see Sail's dropped-column bug)."""


def table_exists(spark: SparkSession, ref: TableRef) -> bool:
    if ref.path:
        return (Path(ref.path) / "_delta_log").is_dir()
    return spark.catalog.tableExists(ref.sql)


def read_table(spark: SparkSession, ref: TableRef, version: int | None = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    if ref.path:
        return reader.load(ref.path)
    return reader.table(ref.sql)


def table_version(spark: SparkSession, ref: TableRef) -> int:
    """The table's latest committed version."""
    if ref.path:
        from deltalake import DeltaTable

        return int(DeltaTable(ref.path).version())
    return int(spark.sql(f"DESCRIBE HISTORY {ref.sql} LIMIT 1").first()["version"])


def _write(df: DataFrame, ref: TableRef, mode: str) -> None:
    writer = df.write.format("delta").mode(mode)
    if ref.path:
        writer.save(ref.path)
    else:
        writer.saveAsTable(ref.sql)


def _check_columns(spark: SparkSession, ref: TableRef, expected: Sequence[str]) -> None:
    got = read_table(spark, ref).columns
    if sorted(got) != sorted(expected):
        raise SchemaDriftError(f"{ref.location}: table has columns {got}, the written data had {list(expected)}")


def check_existing(spark: SparkSession, ref: TableRef, expected: Sequence[str], exact: bool = True) -> bool:
    """Whether the table exists. One whose columns are not ``expected`` (``exact``), or lack some
    of them, is refused before anything is written: Delta refuses such a write without
    ``mergeSchema``, and Spark's error names neither the table nor the columns."""
    if not table_exists(spark, ref):
        return False
    got = read_table(spark, ref).columns
    missing = [c for c in expected if c not in got]
    if missing or (exact and sorted(got) != sorted(expected)):
        raise SchemaDriftError(f"{ref.location}: the existing table has columns {got}, this job "
                               + (f"needs {missing}" if missing else f"writes {list(expected)}")
                               + "; nothing was written (migrate the table or use another schema)")
    return True


def overwrite(spark: SparkSession, df: DataFrame, ref: TableRef) -> None:
    """Replace the table's content in one transaction (creating it if needed)."""
    check_existing(spark, ref, df.columns)
    _write(df, ref, "overwrite")
    _check_columns(spark, ref, df.columns)


def append(spark: SparkSession, df: DataFrame, ref: TableRef) -> None:
    check_existing(spark, ref, df.columns)
    _write(df, ref, "append")
    _check_columns(spark, ref, df.columns)


def upsert(
    spark: SparkSession,
    df: DataFrame,
    ref: TableRef,
    keys: Sequence[str],
    compare: Sequence[str],
    staging_dir: Path,
) -> int:
    """Merge ``df`` into ``ref`` on ``keys``: insert new keys, update rows whose ``compare``
    columns changed, and commit nothing when no row differs, so a re-run adds no version.

    Returns the number of rows inserted or updated.
    """
    if not check_existing(spark, ref, df.columns):
        _write(df, ref, "overwrite")
        _check_columns(spark, ref, df.columns)
        return read_table(spark, ref).count()  # the table, not df: df would be computed a second time
    current = read_table(spark, ref).select(*keys, *compare)
    changed = df.join(current, on=[*keys, *compare], how="left_anti")
    # Stage the delta so MERGE does not read the target it is rewriting; removed once merged (or
    # on the way out of a failed or cancelled merge: SIGTERM unwinds through here)
    stage = staging_dir / f"merge-{ref.name}-{uuid.uuid4().hex[:8]}"
    try:
        changed.write.mode("overwrite").parquet(str(stage))
        src = spark.read.parquet(str(stage))
        n = src.count()
        if n == 0:
            return 0
        view = f"lv_src_{re.sub(r'[^A-Za-z0-9_]', '_', ref.name)}_{uuid.uuid4().hex[:8]}"
        src.createOrReplaceTempView(view)
        on = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        try:
            spark.sql(
                f"MERGE INTO {ref.sql} AS t USING {view} AS s ON {on} "
                "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *"
            )
        finally:
            spark.catalog.dropTempView(view)
        _check_columns(spark, ref, df.columns)
        return n
    finally:
        shutil.rmtree(stage, ignore_errors=True)
