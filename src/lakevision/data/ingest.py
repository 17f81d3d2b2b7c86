"""The ingest job: COCO annotations + image files -> silver, quarantine and gold Delta tables.

Order of work, so that a failure leaves nothing half-done:
1. parse and structurally validate the annotation file (a bad file stops here, nothing written);
2. check image files and validate every record (Spark jobs, no table writes);
3. merge categories, images, annotations and quarantine (each one Delta transaction, skipped
   when nothing changed);
4. rebuild the gold ``samples`` table when any silver table moved past the versions it was built
   from;
5. append one lineage row per table to ``ingest_runs``.
A run killed anywhere leaves every table readable at its last committed version, and running it
again completes the work.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from lakevision import delta
from lakevision.data.lineage import LINEAGE_TABLE, format_inputs, gold_inputs
from lakevision.data.processor import QUARANTINE_KEYS, COCOProcessor
from lakevision.runtime import Runtime

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

SILVER = ("categories", "images", "annotations")
REPORTED = ("images", "annotations", "categories", "quarantine", "samples")
# what a re-run reads from the tables an earlier run wrote (to skip known images and categories)
KNOWN_COLUMNS = {"images": ("id", "file_name", "width", "height"), "categories": ("id",)}
_SPLIT_BUCKETS = 10_000


@dataclass
class IngestResult:
    run_id: str
    tables: dict[str, dict[str, Any]]
    quarantine_by_reason: dict[str, int]
    written: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # category -> split -> objects (non-crowd annotations) in the gold table
    category_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    insufficient: list[str] = field(default_factory=list)  # one warning per category short of samples

    def to_json(self) -> dict[str, Any]:
        return {"tables": self.tables, "quarantine_by_reason": self.quarantine_by_reason,
                "category_counts": self.category_counts, "insufficient": self.insufficient}


def split_column(image_id, splits):
    """``train``/``val``/``test`` from a hash of the image id: stable across runs and engines
    (CRC32 is the same in Spark, Sail and Python's ``zlib.crc32``)."""
    from pyspark.sql import functions as F

    bucket = F.crc32(F.concat(F.lit(f"{splits.seed}:"), image_id.cast("string")).cast("binary")) % _SPLIT_BUCKETS
    train_cut = round(splits.train * _SPLIT_BUCKETS)
    val_cut = round((splits.train + splits.val) * _SPLIT_BUCKETS)
    return F.when(bucket < train_cut, "train").when(bucket < val_cut, "val").otherwise("test")


def build_samples(rt: Runtime, versions: dict[str, int]) -> DataFrame:
    """Gold: one row per valid image with its annotations (and category names) nested."""
    from pyspark.sql import functions as F

    spark = rt.spark
    images = delta.read_table(spark, rt.table("images"), versions["images"])
    anns = delta.read_table(spark, rt.table("annotations"), versions["annotations"])
    cats = delta.read_table(spark, rt.table("categories"), versions["categories"])
    nested = (
        anns.join(cats.select(F.col("id").alias("category_id"), F.col("name").alias("category_name")), "category_id", "left")
        .groupBy("image_id")
        .agg(F.collect_list(F.struct(
            F.col("id"), "category_id", "category_name", "bbox", "area", "iscrowd", "segmentation"
        )).alias("annotations"))
    )
    img_cols = ["file_name", "path", "width", "height", "format", "mode", "exif_orientation", "sha256"]
    joined = images.select(F.col("id").alias("image_id"), *img_cols).join(nested, "image_id", "left")
    return joined.select(
        "image_id", *img_cols,
        split_column(F.col("image_id"), rt.config.data.splits).alias("split"),
        F.coalesce(F.size("annotations"), F.lit(0)).cast("int").alias("num_annotations"),
        "annotations",
    )


def category_counts(rt: Runtime, samples_version: int) -> dict[str, dict[str, int]]:
    """Objects per category and split in the gold table; a category without any is listed too."""
    from pyspark.sql import functions as F

    spark = rt.spark
    samples = delta.read_table(spark, rt.table("samples"), samples_version)
    rows = (samples.select("split", F.explode("annotations").alias("a"))
            .where(F.col("a.iscrowd") == 0)
            .groupBy("split", F.col("a.category_name").alias("category")).count().collect())
    names = [r["name"] for r in delta.read_table(spark, rt.table("categories")).select("name").collect()]
    counts = {name: {"train": 0, "val": 0, "test": 0} for name in sorted(names)}
    for r in rows:
        counts.setdefault(r["category"], {"train": 0, "val": 0, "test": 0})[r["split"]] = int(r["count"])
    return counts


def insufficient_categories(counts: dict[str, dict[str, int]], minimum: int) -> list[str]:
    """A warning per category with fewer than ``minimum`` training objects."""
    return [f"{name}: {c['train']} training objects, fewer than min_samples_per_category ({minimum})"
            for name, c in counts.items() if c["train"] < minimum]


def run_ingest(rt: Runtime, annotations: str, images: str, progress: bool = False) -> IngestResult:
    t0 = time.monotonic()
    if "://" not in images and not Path(images).is_dir():
        raise FileNotFoundError(f"{images}: image folder does not exist")
    spark = rt.spark
    proc = COCOProcessor(spark, rt.config.data, staging_dir=rt.staging_dir)
    try:
        proc.load_coco_annotations(annotations)
        refs = {name: rt.table(name) for name in (*REPORTED, LINEAGE_TABLE)}
        known = {n: delta.read_table(spark, refs[n]) if delta.check_existing(spark, refs[n], KNOWN_COLUMNS[n], exact=False)
                 else None for n in KNOWN_COLUMNS}
        proc.set_known(known["images"], known["categories"])
        proc.check_images(images, progress=progress)
        found = proc.validate_data()

        silver = {"categories": proc.valid_categories, "images": proc.valid_images,
                  "annotations": proc.valid_annotations, "quarantine": proc.quarantine}
        for name, frame in silver.items():  # every table checked before the first is written
            delta.check_existing(spark, refs[name], frame.columns)
        written = {name: proc.save_to_delta(frame, refs[name].location,
                                            list(QUARANTINE_KEYS) if name == "quarantine" else None)
                   for name, frame in silver.items()}
        versions = {n: delta.table_version(spark, refs[n]) for n in (*SILVER, "quarantine")}
        inputs = format_inputs(versions, SILVER)
        if not delta.table_exists(spark, refs["samples"]) or gold_inputs(rt) != inputs:
            delta.overwrite(spark, build_samples(rt, versions), refs["samples"])
            written["samples"] = 1
        versions["samples"] = delta.table_version(spark, refs["samples"])

        tables = {
            n: {"location": refs[n].location, "version": versions[n],
                "rows": delta.read_table(spark, refs[n], versions[n]).count()}
            for n in REPORTED
        }
        finished = dt.datetime.now(dt.timezone.utc).isoformat()
        lineage = pd.DataFrame([
            {"run_id": proc.run_id, "finished_at": finished, "annotation_file": proc.source.source_file,
             "annotation_sha256": proc.source.sha256, "image_dir": str(images), "table_name": n,
             "location": t["location"], "version": t["version"], "rows": t["rows"],
             "inputs": inputs if n == "samples" else ""}
            for n, t in tables.items()
        ])
        delta.append(spark, spark.createDataFrame(lineage), refs[LINEAGE_TABLE])
        counts = category_counts(rt, versions["samples"])
        insufficient = insufficient_categories(counts, rt.config.data.min_samples_per_category)
        for warning in insufficient:
            log.warning("data sufficiency: %s", warning)
        return IngestResult(
            run_id=proc.run_id,
            tables=tables,
            quarantine_by_reason={code: len(ids) for code, ids in sorted(found.items())},
            written=written,
            seconds=time.monotonic() - t0,
            category_counts=counts,
            insufficient=insufficient,
        )
    finally:
        proc.cleanup()
