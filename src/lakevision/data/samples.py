"""The gold ``samples`` table read into plain records: one split at one Delta version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakevision.errors import DataError

if TYPE_CHECKING:
    from lakevision.runtime import Runtime


@dataclass
class SplitRecords:
    """Everything a worker needs to build a dataset, without Spark: plain, picklable lists."""

    image_paths: list[str]
    annotations: list[dict]
    category_ids: list[int]
    category_names: list[str]
    table: str
    version: int


def load_split(rt: Runtime, split: str | Sequence[str], version: int | None = None) -> SplitRecords:
    """Rows of the gold ``samples`` table at ``version`` (default latest) for ``split``."""
    from pyspark.sql import functions as F

    from lakevision import delta
    from lakevision.data.lineage import gold_inputs, parse_inputs

    ref = rt.table("samples")
    if not delta.table_exists(rt.spark, ref):
        raise FileNotFoundError(f"{ref.location}: no samples table; run `lakevision ingest` first")
    latest = delta.table_version(rt.spark, ref)
    version = latest if version is None else int(version)
    if not 0 <= version <= latest:
        raise DataError(f"{ref.location}: no version {version}; the table has versions 0 to {latest}")
    splits = [split] if isinstance(split, str) else list(split)
    rows = (delta.read_table(rt.spark, ref, version)
            .filter(F.col("split").isin(splits))
            .select("image_id", "path", "width", "height", "annotations")
            .orderBy("image_id")
            .collect())
    # the categories this gold version was built from: a later ingest may have added some
    inputs = gold_inputs(rt, version)
    cats_version = parse_inputs(inputs).get("categories") if inputs else None
    cats = delta.read_table(rt.spark, rt.table("categories"), cats_version).orderBy("id").collect()
    records = [{"image_id": r["image_id"], "width": r["width"], "height": r["height"],
                "annotations": [a.asDict(recursive=True) for a in (r["annotations"] or [])]} for r in rows]
    return SplitRecords(
        image_paths=[r["path"] for r in rows],
        annotations=records,
        category_ids=[c["id"] for c in cats],
        category_names=[c["name"] for c in cats],
        table=ref.location,
        version=version,
    )
