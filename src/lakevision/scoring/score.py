"""The score job: a model version over a Delta table of images, on the Spark workers, merged into a
Delta table with one row per (image, model version).

1. The model is resolved to one immutable version (``@champion`` by default) and its artifacts are
   staged once on shared storage (:func:`lakevision.packaging.batch.stage_model`).
2. The images still to score are the input rows (the ``images`` silver table at a version, or any
   table with an id and a path column) that have no row for this model version yet; they are
   staged as Parquet and scored in rounds of ``round_images``.
3. Each round runs :class:`ScorePartition` through ``mapInPandas``: every worker process loads the
   model once, reads the files from their paths in batches of at most ``batch_bytes`` and answers
   exactly as the served model does (same decoding, same response). A file that cannot be read or
   decoded is a row with an ``error``, never a failed job.
4. Each round is one ``MERGE`` keyed by (image id, model name, model version): a run killed half way
   leaves the table readable at its last round, and the next run scores only what is missing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lakevision import delta
from lakevision.errors import DataError, LakevisionError
from lakevision.packaging.batch import (TaskResources, byte_batches, cached_model, concurrent_tasks,
                                        default_partitions, file_size, read_file, stage_model, worker_process)
from lakevision.packaging.pyfunc import SPEC_FILE
from lakevision.runtime import Runtime, TableRef

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)

DEFAULT_INPUT_TABLE = "images"
DEFAULT_MODEL = "@champion"
KEYS = ("image_id", "model_name", "model_version")
SCORE_SCHEMA = ("image_id long, path string, model_name string, model_version string, model_uri string, "
                "prediction string, error string, scored_at timestamp, inference_ms double")
STAGE_SCHEMA = SCORE_SCHEMA + ", worker string"  # the load that scored the row, counted then dropped
SCORE_COLUMNS = [c.split()[0] for c in SCORE_SCHEMA.split(", ")]
PREDICTION_FAILED = "prediction failed"
_ROWS_PER_OUTPUT_BATCH = 1024
_INTEGER_TYPES = ("tinyint", "smallint", "int", "bigint", "byte", "short", "integer", "long")


class ScoringError(LakevisionError, RuntimeError):
    """The job cannot score (no model, a model that answers no image)."""


# ---------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelToScore:
    uri: str  # immutable: a registry version (models:/name/3) or a logged model
    name: str  # the registered model; the URI itself for an unregistered model
    version: str  # the registry version; "" for an unregistered model


def resolve_model(rt: Runtime, model: str | None = None, model_name: str | None = None) -> ModelToScore:
    """``@alias`` (of ``model_name``, default ``deployment.model_name``), ``models:/name@alias``,
    ``models:/name/N``, or any other model URI (scored as an unregistered model)."""
    from lakevision.registry.model_registry import ModelRegistry

    model = (model or DEFAULT_MODEL).strip()
    name, alias, version = None, None, None
    if model.startswith("@"):
        name, alias = model_name or rt.config.deployment.model_name, model[1:]
    elif model.startswith("models:/") and "@" in model:
        name, _, alias = model[len("models:/"):].partition("@")
    elif model.startswith("models:/") and model.count("/") == 2 and model.rsplit("/", 1)[1].isdigit():
        name, version = model[len("models:/"):].rsplit("/", 1)
    if name is None:
        return ModelToScore(model, model, "")
    registry = ModelRegistry(rt, name)
    found = registry.by_alias(alias) if alias else registry.get(version)
    if found is None:
        raise ScoringError(f"{registry.name} has no {alias!r} version to score; give --model a version "
                           f"(models:/{registry.name}/N) or another alias")
    return ModelToScore(found.registry_uri, found.name, found.version)


# ---------------------------------------------------------------------- on the workers
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _row_message(message: str) -> str:
    """The serving path's message without its request row (``row 0: ...``)."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.startswith("row ") else message


@dataclass(frozen=True)
class ScorePartition:
    """The ``mapInPandas`` function of one round: (``image_id``, ``path``[, ``byte_size``]) rows in,
    :data:`STAGE_SCHEMA` rows out, one output batch per ``batch_bytes`` of files read."""

    model: ModelToScore
    model_dir: str
    batch_bytes: int
    batch_size: int
    max_file_bytes: int
    resources: TaskResources

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from lakevision.packaging.pyfunc import load_local_image_model

        device = self.resources.apply()
        loaded = cached_model(("image_model", self.model.uri, device),
                              functools.partial(load_local_image_model, self.model_dir, device))
        for frame in batches:
            if frame.empty:
                continue
            paths = frame["path"].tolist()
            if "byte_size" in frame.columns:
                sizes = [int(s) if pd.notna(s) else file_size(p) for s, p in zip(frame["byte_size"], paths)]
            else:
                sizes = [file_size(p) for p in paths]
            for rows in byte_batches(sizes, self.batch_bytes, _ROWS_PER_OUTPUT_BATCH):
                yield self.score(loaded.model, frame.iloc[rows], loaded.token)

    def score(self, image_model, frame: pd.DataFrame, token: str) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        from lakevision.packaging.pyfunc import decode_file

        paths = frame["path"].tolist()
        n = len(paths)
        predictions: list[str | None] = [None] * n
        errors: list[str | None] = [None] * n
        millis: list[float | None] = [None] * n
        decoded = []
        for i, path in enumerate(paths):
            try:
                decoded.append((i, decode_file(read_file(path, self.max_file_bytes), image_model.spec)))
            except MlflowException as exc:
                errors[i] = _row_message(exc.message)
            except (OSError, ValueError) as exc:
                errors[i] = f"cannot read the file: {getattr(exc, 'strerror', None) or exc}"
        for start in range(0, len(decoded), self.batch_size):
            group = decoded[start:start + self.batch_size]
            t0 = time.perf_counter()
            answers = _predict(image_model, [d for _, d in group])
            each = (time.perf_counter() - t0) * 1000 / len(group)
            for (i, _), (answer, problem) in zip(group, answers):
                predictions[i], errors[i], millis[i] = answer, problem, each
        return pd.DataFrame({
            "image_id": frame["image_id"].astype("int64").to_numpy(),
            "path": paths,
            "model_name": self.model.name,
            "model_version": self.model.version,
            "model_uri": self.model.uri,
            "prediction": predictions,
            "error": errors,
            "scored_at": pd.Timestamp.now(tz="UTC"),
            "inference_ms": pd.array(millis, dtype="Float64"),
            "worker": token,
        })


def _predict(image_model, images: list) -> list[tuple[str | None, str | None]]:
    """(prediction JSON, error) per image; a batch that fails is retried one image at a time, so a
    failure is the one image's."""
    try:
        rows = image_model.predict_images(images).to_dict("records")
        return [(json.dumps(r, default=_json_default), None) for r in rows]
    except Exception:  # isolate the image at fault below; the job fails only if none can be answered
        if len(images) == 1:
            return [_predict_one(image_model, images[0])]
        return [_predict_one(image_model, im) for im in images]


def _predict_one(image_model, image) -> tuple[str | None, str | None]:
    try:
        row = image_model.predict_images([image]).to_dict("records")[0]
        return json.dumps(row, default=_json_default), None
    except Exception as exc:  # one image's failure is its row's error
        return None, f"{PREDICTION_FAILED}: {type(exc).__name__}: {exc}"[:2000]


# ---------------------------------------------------------------------- on the driver
@dataclass
class ScoreResult:
    """One run of the score job."""

    model_uri: str
    model_name: str
    model_version: str
    source: dict[str, Any]  # table, version, rows
    output: dict[str, Any]  # location, version, rows
    scored: int = 0  # images scored by this run (errors included)
    errors: int = 0  # of those, images with an error row
    skipped: int = 0  # input images that already had a row for this model version
    rounds: int = 0
    partitions: int = 0
    seconds: float = 0.0
    model_loads: int = 0  # distinct model loads (worker process x load) that scored this run's rows
    worker_processes: int = 0
    error_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 3)}


def input_table_ref(rt: Runtime, table: str | None) -> TableRef:
    """A table of the target's schema by name, a three-level Unity Catalog name, or a path."""
    if not table:
        return rt.table(DEFAULT_INPUT_TABLE)
    if "/" in table:
        return TableRef(table.rstrip("/").rsplit("/", 1)[-1], path=table)
    if table.count(".") == 2:
        return TableRef(table.rsplit(".", 1)[1], full_name=table)
    return rt.table(table)


def _read_input(rt: Runtime, ref: TableRef, version: int | None, id_column: str, path_column: str
                ) -> tuple[DataFrame, int]:
    from pyspark.sql import functions as F

    if not delta.table_exists(rt.spark, ref):
        hint = "; run `lakevision ingest` first" if ref.name == DEFAULT_INPUT_TABLE else ""
        raise DataError(f"{ref.location}: no Delta table to score{hint}")
    latest = delta.table_version(rt.spark, ref)
    version = latest if version is None else int(version)
    if not 0 <= version <= latest:
        raise DataError(f"{ref.location}: no version {version}; the table has versions 0 to {latest}")
    df = delta.read_table(rt.spark, ref, version)
    types = dict(df.dtypes)
    for column, option in ((id_column, "--id-column"), (path_column, "--path-column")):
        if column not in types:
            raise DataError(f"{ref.location}@v{version}: no column {column!r} (columns: {', '.join(df.columns)}); "
                            f"name the right one with {option}")
    if types[id_column] not in _INTEGER_TYPES:
        raise DataError(f"{ref.location}@v{version}: column {id_column!r} is {types[id_column]}; image ids must be "
                        "integers")
    if types[path_column] != "string":
        raise DataError(f"{ref.location}@v{version}: column {path_column!r} is {types[path_column]}, not a string path")
    columns = [F.col(id_column).cast("long").alias("image_id"), F.col(path_column).alias("path")]
    if "byte_size" in types and types["byte_size"] in _INTEGER_TYPES:
        columns.append(F.col("byte_size").cast("long").alias("byte_size"))
    return df.select(*columns), version


def _check_ids(src: DataFrame, ref: TableRef, version: int, id_column: str, path_column: str) -> int:
    """The row count; a null or repeated image id stops the job (a MERGE key must be unique)."""
    from pyspark.sql import functions as F

    stats = src.agg(F.count(F.lit(1)).alias("rows"),
                    F.sum(F.when(F.col("image_id").isNull(), 1).otherwise(0)).alias("null_ids")).first()
    if stats["null_ids"]:
        example = src.filter(F.col("image_id").isNull()).select("path").first()
        raise DataError(f"{ref.location}@v{version}: {stats['null_ids']} row(s) have no {id_column!r} (e.g. the row "
                        f"with {path_column} {example['path']!r}); every image needs an id")
    repeated = src.groupBy("image_id").count().filter(F.col("count") > 1).orderBy("image_id").first()
    if repeated is not None:
        raise DataError(f"{ref.location}@v{version}: {id_column} {repeated['image_id']} is on {repeated['count']} rows; "
                        "image ids must be unique")
    return int(stats["rows"] or 0)


def run_scoring(rt: Runtime, model: str | None = None, model_name: str | None = None, input_table: str | None = None,
                input_version: int | None = None, id_column: str = "id", path_column: str = "path",
                output_table: str | None = None, partitions: int | None = None,
                retry_errors: bool = False) -> ScoreResult:
    import mlflow
    from pyspark.sql import functions as F

    settings = rt.config.deployment.scoring
    t0 = time.monotonic()
    mlflow.set_tracking_uri(rt.tracking_uri)
    mlflow.set_registry_uri(rt.registry_uri)
    target = resolve_model(rt, model, model_name)
    source_ref = input_table_ref(rt, input_table)
    src, version = _read_input(rt, source_ref, input_version, id_column, path_column)
    total = _check_ids(src, source_ref, version, id_column, path_column)
    out_ref = rt.table(output_table or settings.output_table)
    result = ScoreResult(target.uri, target.name, target.version,
                         source={"table": source_ref.location, "version": version, "rows": total},
                         output={"location": out_ref.location, "version": None, "rows": 0})
    todo = src
    if delta.check_existing(rt.spark, out_ref, SCORE_COLUMNS):
        done = delta.read_table(rt.spark, out_ref).filter(
            (F.col("model_name") == target.name) & (F.col("model_version") == target.version))
        if retry_errors:
            done = done.filter(F.col("error").isNull())
        todo = src.join(done.select("image_id"), "image_id", "left_anti")
    stage = rt.staging_dir / f"score-{uuid.uuid4().hex[:12]}"
    try:
        todo.write.mode("overwrite").parquet(str(stage / "todo"))
        pending = rt.spark.read.parquet(str(stage / "todo"))
        n = pending.count()
        result.skipped = total - n
        if n:
            _score_rounds(rt, target, pending, n, out_ref, stage, partitions or settings.partitions, result)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if delta.table_exists(rt.spark, out_ref):
        result.output.update(version=delta.table_version(rt.spark, out_ref),
                             rows=delta.read_table(rt.spark, out_ref).count())
    result.seconds = time.monotonic() - t0
    return result


def _score_rounds(rt: Runtime, target: ModelToScore, pending: DataFrame, n: int, out_ref: TableRef, stage,
                  partitions: int, result: ScoreResult) -> None:
    from pyspark.sql import functions as F

    settings = rt.config.deployment.scoring
    model_dir = stage_model(target.uri, rt.storage("models"))
    if not any(model_dir.rglob(SPEC_FILE)):
        raise ScoringError(f"{target.uri} is not a lakevision serving model (it has no {SPEC_FILE}); the score job "
                           "runs the pyfunc the train job logs")
    rounds = math.ceil(n / settings.round_images)
    parts = max(1, min(default_partitions(rt.spark, partitions), math.ceil(n / rounds)))
    scorer = ScorePartition(target, str(model_dir), settings.batch_bytes, settings.batch_size,
                            settings.max_file_bytes,
                            TaskResources(settings.threads_per_task, settings.use_gpu, concurrent_tasks(parts)))
    result.rounds, result.partitions = rounds, parts
    tokens: set[str] = set()
    for r in range(rounds):
        t0 = time.monotonic()
        chunk = pending if rounds == 1 else pending.filter(
            F.crc32(F.col("image_id").cast("string").cast("binary")) % rounds == r)
        out = stage / f"round-{r}"
        chunk.repartition(parts).mapInPandas(scorer, STAGE_SCHEMA).write.mode("overwrite").parquet(str(out))
        scored = rt.spark.read.parquet(str(out))
        stats = scored.groupBy("worker").agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(F.when(F.col("error").isNotNull(), 1).otherwise(0)).alias("errors"),
            F.sum(F.when(F.col("error").startswith(PREDICTION_FAILED), 1).otherwise(0)).alias("failed")).collect()
        rows = sum(int(s["rows"]) for s in stats)
        errors = sum(int(s["errors"]) for s in stats)
        failed = sum(int(s["failed"]) for s in stats)
        if rows and failed == rows:
            example = scored.filter(F.col("error").isNotNull()).select("path", "error").first()
            raise ScoringError(f"{target.uri}: the model answered none of {rows} images (e.g. {example['path']}: "
                               f"{example['error']}); nothing of this round was written")
        delta.upsert(rt.spark, scored.drop("worker"), out_ref, list(KEYS), ["prediction", "error"], stage)
        tokens |= {s["worker"] for s in stats}
        result.scored += rows
        result.errors += errors
        if errors and len(result.error_examples) < 5:
            result.error_examples += [r.asDict() for r in scored.filter(F.col("error").isNotNull())
                                      .select("image_id", "path", "error").limit(5 - len(result.error_examples))
                                      .collect()]
        log.info("round %d/%d: %d images (%d errors) in %.1f s", r + 1, rounds, rows, errors, time.monotonic() - t0)
    result.model_loads = len(tokens)
    result.worker_processes = len({worker_process(t) for t in tokens})
