"""COCOProcessor: COCO annotations and image files into validated Spark DataFrames and Delta tables.

The driver only parses the JSON (see :mod:`lakevision.data.coco_json`) and hands Spark Parquet files
in a staging folder; validation, image checks and writes are Spark jobs, so the same code runs on
Sail locally and on a Databricks cluster.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lakevision import delta
from lakevision.config import DataProcessing
from lakevision.data.coco_json import CocoTables, read_coco
from lakevision.data.image_check import CHECK_SCHEMA, make_checker
from lakevision.errors import LakevisionError
from lakevision.runtime import TableRef

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

REASON_CODES = (
    "missing_file",
    "undecodable",
    "too_small",
    "too_large",
    "size_mismatch",
    "unknown_image",
    "unknown_category",
    "bbox_out_of_bounds",
    "invalid_bbox",
    "duplicate_id",
    # hostile input: a file_name that leaves the image folder or is no regular file (never opened),
    # a value the tables cannot hold, a crowd RLE that does not decode to its image's size
    "unsafe_file",
    "invalid_value",
    "invalid_segmentation",
)
QUARANTINE_KEYS = ("record_kind", "record_id", "reason", "source_file")
# Columns whose change makes a record "changed" on re-ingest (run ids and file paths do not).
_CONTENT = {
    "images": ["file_name", "width", "height", "decoded_width", "decoded_height", "format", "mode",
               "exif_orientation", "byte_size", "sha256", "license", "coco_url", "date_captured"],
    "annotations": ["image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"],
    "categories": ["name", "supercategory"],
    "quarantine": ["detail"],
}


class NotLoadedError(LakevisionError, RuntimeError):
    """A processor step asked for before load_annotations."""


def _with_hash(df: DataFrame, table: str) -> DataFrame:
    from pyspark.sql import functions as F

    return df.withColumn("row_hash", F.xxhash64(*[F.col(c) for c in _CONTENT[table]]))


def _first_occurrence(df: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Split records into the first of each id (in file order) and the later duplicates."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ranked = df.withColumn("_rank", F.row_number().over(Window.partitionBy("id").orderBy("_pos")))
    return ranked.filter("_rank = 1").drop("_rank"), ranked.filter("_rank > 1").drop("_rank")


def _quarantine(df: DataFrame, kind: str, reason: Column | str, detail: Column) -> DataFrame:
    from pyspark.sql import functions as F

    reason_col = F.lit(reason) if isinstance(reason, str) else reason
    return df.select(
        F.lit(kind).alias("record_kind"),
        F.col("id").alias("record_id"),
        reason_col.alias("reason"),
        detail.alias("detail"),
        "source_file",
        "ingest_run_id",
        "_pos",
    )


def as_table_ref(location: str) -> TableRef:
    """A path (``/tmp/t``, ``./t``) or a Unity Catalog name (``catalog.schema.table``)."""
    if "/" not in location and location.count(".") == 2:
        return TableRef(location.rsplit(".", 1)[1], full_name=location)
    path = str(Path(location).resolve())
    return TableRef(Path(path).name, path=path)


class COCOProcessor:
    """Load a COCO annotation file, check its images and validate every record with Spark.

    After :meth:`validate_data`, ``valid_images``, ``valid_annotations``, ``valid_categories`` and
    ``quarantine`` hold the results as Spark DataFrames.
    """

    def __init__(
        self,
        spark: SparkSession,
        config: DataProcessing | None = None,
        staging_dir: str | os.PathLike | None = None,
        run_id: str | None = None,
    ):
        self.spark = spark
        self.config = config or DataProcessing()
        self.run_id = run_id or uuid.uuid4().hex
        # Workers must read what the driver stages: on Databricks pass a UC Volume folder.
        base = Path(staging_dir) if staging_dir else Path(tempfile.gettempdir()) / "lakevision-staging"
        self.staging_dir = (base / self.run_id).resolve()
        self.source: CocoTables | None = None
        self.images: DataFrame | None = None
        self.annotations: DataFrame | None = None
        self.categories: DataFrame | None = None
        self.rejected: DataFrame | None = None  # records the parser took out (invalid_value, invalid_segmentation)
        self.image_checks: DataFrame | None = None
        self.known_images: DataFrame | None = None
        self.known_categories: DataFrame | None = None
        self.valid_images: DataFrame | None = None
        self.valid_annotations: DataFrame | None = None
        self.valid_categories: DataFrame | None = None
        self.quarantine: DataFrame | None = None

    # ------------------------------------------------------------------ loading
    def _stage(self, name: str, table: pa.Table) -> DataFrame:
        """Hand an Arrow table to Spark through Parquet: ``createDataFrame`` caps a message at 128 MiB."""
        n = table.num_rows
        table = table.append_column("source_file", pa.array([self.source.source_file] * n, pa.string()))
        table = table.append_column("ingest_run_id", pa.array([self.run_id] * n, pa.string()))
        path = self.staging_dir / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="none")  # read once, from local disk
        return self.spark.read.parquet(str(path))

    def load_coco_annotations(self, annotation_file: str) -> None:
        """Parse and structurally check ``annotation_file``; raise :class:`CocoFormatError` naming
        the file and the field if it cannot be used. Writes nothing to any table."""
        self.source = read_coco(annotation_file)
        self.images = self._stage("images", self.source.images)
        self.annotations = self._stage("annotations", self.source.annotations)
        self.categories = self._stage("categories", self.source.categories)
        self.rejected = self._stage("rejected", self.source.rejected)

    def _require_loaded(self) -> None:
        if self.source is None:
            raise NotLoadedError("call load_coco_annotations() first")

    def set_known(self, images: DataFrame | None, categories: DataFrame | None) -> None:
        """Records already in the tables: unchanged images are not checked again, and annotations
        may refer to images and categories ingested by an earlier run."""
        self.known_images = images
        self.known_categories = categories

    # ------------------------------------------------------------------ image files
    def _partitions(self, n: int) -> int:
        # Two partitions per core balanced best on 2 cores: more pay UDF start-up per partition,
        # fewer leave a core idle at the tail of each batch (benchmarks/ingest.py).
        wanted = self.config.image_check_partitions or 2 * (os.cpu_count() or 2)
        return max(1, min(n, wanted))

    def check_images(self, image_dir: str, progress: bool = False) -> DataFrame:
        """Check every image file the annotations list (first occurrence of each id) on the Spark
        workers, in batches of ``image_check_batch_size`` so a progress bar can follow.

        Images already ingested with the same id, file name and size are not checked again.
        """
        from pyspark.sql import functions as F
        from tqdm.auto import tqdm

        self._require_loaded()
        image_dir = str(Path(image_dir).resolve()) if "://" not in image_dir else image_dir
        firsts, _ = _first_occurrence(self.images)
        todo = firsts.select("id", "file_name", "width", "height")
        if self.known_images is not None:
            todo = todo.join(self.known_images.select("id", "file_name", "width", "height"),
                             on=["id", "file_name", "width", "height"], how="left_anti")
        todo_pdf = todo.select("id", "file_name").orderBy("id").toPandas()
        out = self.staging_dir / "image_checks"
        step = self.config.image_check_batch_size
        checker = make_checker(image_dir, self.config.validation.max_image_size)
        with tqdm(total=len(todo_pdf), unit="img", desc="checking images", disable=not progress) as bar:
            for start in range(0, len(todo_pdf), step):
                chunk = todo_pdf.iloc[start : start + step]
                (self.spark.createDataFrame(chunk)
                    .repartition(self._partitions(len(chunk)))
                    .mapInPandas(checker, CHECK_SCHEMA)
                    .write.mode("append").parquet(str(out)))
                bar.update(len(chunk))
        if len(todo_pdf):
            self.image_checks = self.spark.read.parquet(str(out))
        else:
            self.image_checks = self.spark.createDataFrame([], CHECK_SCHEMA)
        self.image_checks = self.image_checks.withColumn("id", F.col("id").cast("long"))
        return self.image_checks

    def process_images(self, image_dir: str) -> pd.DataFrame:
        """Check the image files (see :meth:`check_images`) and return the results as pandas."""
        return self.check_images(image_dir).toPandas()

    # ------------------------------------------------------------------ validation
    def validate_data(self, df: DataFrame | pd.DataFrame | None = None) -> dict[str, list[str]]:
        """Validate every record; return ``{reason_code: ["image:12", "annotation:40", ...]}``.

        ``df`` holds image check results (from :meth:`check_images` or :meth:`process_images`);
        by default the last ones. Each bad record gets exactly one reason code: the parser's
        (``invalid_value``, ``invalid_segmentation`` for an RLE that does not decode), else
        ``duplicate_id``, else the first check below that fails.
        """
        from pyspark.sql import functions as F

        self._require_loaded()
        if df is None:
            df = self.image_checks
        if df is None:
            raise NotLoadedError("call check_images() or process_images() before validate_data()")
        checks = self.spark.createDataFrame(df) if isinstance(df, pd.DataFrame) else df
        rules = self.config.validation
        tol = float(rules.bbox_tolerance)

        # --- images
        img_first, img_dup = _first_occurrence(self.images)
        checked = img_first.join(checks, on="id", how="inner")
        dw, dh = F.col("decoded_width"), F.col("decoded_height")
        reason = (
            F.when(F.col("refused").isNotNull(), "unsafe_file")
            .when(~F.col("file_exists"), "missing_file")
            .when(F.col("decode_error").isNotNull(), "undecodable")
            .when((dw != F.col("width")) | (dh != F.col("height")), "size_mismatch")
            .when(F.least(dw, dh) < rules.min_image_size, "too_small")
            .when(F.greatest(dw, dh) > rules.max_image_size, "too_large")
        )
        detail = (
            F.when(F.col("refused").isNotNull(), F.col("refused"))
            .when(~F.col("file_exists"), F.concat(F.lit("no file at "), F.col("path")))
            .when(F.col("decode_error").isNotNull(), F.concat(F.col("path"), F.lit(": "), F.col("decode_error")))
            .otherwise(F.format_string("%s: JSON says %dx%d, decoded %dx%d (min %d, max %d)", F.col("path"),
                                       F.col("width"), F.col("height"), dw, dh,
                                       F.lit(rules.min_image_size), F.lit(rules.max_image_size)))
        )
        checked = checked.withColumn("_reason", reason).withColumn("_detail", detail)
        bad_images = _quarantine(checked.filter("_reason IS NOT NULL"), "image", F.col("_reason"), F.col("_detail"))
        dup_images = _quarantine(img_dup, "image", "duplicate_id",
                                 F.format_string("image id %d repeated at images[%d]", F.col("id"), F.col("_pos")))
        good_images = checked.filter("_reason IS NULL").drop("_reason", "_detail", "file_exists", "decode_error",
                                                              "refused", "_pos")
        self.valid_images = _with_hash(good_images, "images")

        # --- categories
        cat_first, cat_dup = _first_occurrence(self.categories)
        dup_cats = _quarantine(cat_dup, "category", "duplicate_id",
                               F.format_string("category id %d repeated at categories[%d]", F.col("id"), F.col("_pos")))
        self.valid_categories = _with_hash(cat_first.drop("_pos"), "categories")
        cat_ids = cat_first.select("id")
        if self.known_categories is not None:
            cat_ids = cat_ids.union(self.known_categories.select("id")).distinct()

        # --- annotations: boxes are checked against the JSON size of their image
        ann_first, ann_dup = _first_occurrence(self.annotations)
        dims = img_first.select(F.col("id").alias("image_id"), F.col("width").alias("_w"), F.col("height").alias("_h"))
        if self.known_images is not None:
            known = self.known_images.select(F.col("id").alias("image_id"), F.col("width").alias("_w"),
                                             F.col("height").alias("_h"))
            dims = dims.union(known.join(dims.select("image_id"), "image_id", "left_anti"))
        anns = (
            ann_first.join(dims, "image_id", "left")
            .join(cat_ids.select(F.col("id").alias("category_id"), F.lit(True).alias("_cat_ok")), "category_id", "left")
        )
        x, y, w, h = (F.col("bbox")[i] for i in range(4))
        bbox_invalid = (
            F.col("bbox").isNull() | (F.size("bbox") != 4)
            | F.isnan(x) | F.isnan(y) | F.isnan(w) | F.isnan(h) | (w <= 0) | (h <= 0)
        )
        out_of_bounds = (x < -tol) | (y < -tol) | (x + w > F.col("_w") + tol) | (y + h > F.col("_h") + tol)
        rle_size = F.col("segmentation.rle_size")
        rle_mismatch = rle_size.isNotNull() & ((rle_size[0] != F.col("_h")) | (rle_size[1] != F.col("_w")))
        ann_reason = (
            F.when(F.col("_w").isNull(), "unknown_image")
            .when(F.col("_cat_ok").isNull(), "unknown_category")
            .when(bbox_invalid, "invalid_bbox")
            .when(out_of_bounds, "bbox_out_of_bounds")
            .when(rle_mismatch, "invalid_segmentation")
        )
        bbox_txt = F.coalesce(F.concat_ws(", ", F.col("bbox").cast("array<string>")), F.lit("null"))
        ann_detail = (
            F.when(F.col("_w").isNull(), F.format_string("image_id %d is not in the images list", F.col("image_id")))
            .when(F.col("_cat_ok").isNull(),
                  F.format_string("category_id %d is not in the categories list", F.col("category_id")))
            .when(F.col("_reason") == "invalid_segmentation",
                  F.format_string("segmentation.size [%d, %d] is not the image's [height, width] [%d, %d]",
                                  rle_size[0], rle_size[1], F.col("_h"), F.col("_w")))
            .otherwise(F.concat(F.lit("bbox ["), bbox_txt,
                                F.format_string("] on a %dx%d image", F.col("_w"), F.col("_h"))))
        )
        anns = anns.withColumn("_reason", ann_reason).withColumn("_detail", ann_detail)
        bad_anns = _quarantine(anns.filter("_reason IS NOT NULL"), "annotation", F.col("_reason"), F.col("_detail"))
        dup_anns = _quarantine(ann_dup, "annotation", "duplicate_id",
                               F.format_string("annotation id %d repeated at annotations[%d]", F.col("id"), F.col("_pos")))
        good_anns = (
            anns.filter("_reason IS NULL")
            .withColumn("area", F.coalesce(F.col("area"), w * h))
            .drop("_reason", "_detail", "_w", "_h", "_cat_ok", "_pos")
        )
        self.valid_annotations = _with_hash(good_anns, "annotations")

        rejected = self.rejected.select("record_kind", "record_id", "reason", "detail", "source_file",
                                        "ingest_run_id", "_pos")
        quarantine = (
            rejected.unionByName(bad_images).unionByName(dup_images).unionByName(dup_cats).unionByName(bad_anns)
            .unionByName(dup_anns)
        )
        # A third copy of an id repeats the key of the second: keep one row per key.
        self.quarantine = _with_hash(quarantine.dropDuplicates(list(QUARANTINE_KEYS)).drop("_pos"), "quarantine")
        found: dict[str, list[str]] = {}
        for row in self.quarantine.select("record_kind", "record_id", "reason").orderBy("record_kind", "record_id").collect():
            found.setdefault(row["reason"], []).append(f"{row['record_kind']}:{row['record_id']}")
        return found

    # ------------------------------------------------------------------ writing
    def save_to_delta(self, df: DataFrame, output_path: str, keys: list[str] | None = None) -> int:
        """Merge ``df`` into the Delta table at ``output_path`` (a folder or a UC name) on ``keys``
        (default: ``id``, or the quarantine key). Rows already there unchanged are not rewritten,
        so saving the same data twice adds no version. Returns the rows written."""
        ref = as_table_ref(output_path)
        if keys is None:
            keys = list(QUARANTINE_KEYS) if "record_kind" in df.columns else ["id"]
        compare = ["row_hash"] if "row_hash" in df.columns else [c for c in df.columns if c not in keys]
        return delta.upsert(self.spark, df, ref, keys, compare, self.staging_dir)

    def cleanup(self) -> None:
        """Remove this run's staging files."""
        import shutil

        shutil.rmtree(self.staging_dir, ignore_errors=True)
