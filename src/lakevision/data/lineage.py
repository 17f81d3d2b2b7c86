"""The ``ingest_runs`` table: which silver table versions each version of the gold table was
built from. Ingest writes it; readers of an older gold version use it to read the matching
categories."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lakevision import delta

if TYPE_CHECKING:
    from lakevision.runtime import Runtime

LINEAGE_TABLE = "ingest_runs"


def format_inputs(versions: dict[str, int], tables: tuple[str, ...]) -> str:
    """``categories@3,images@2,annotations@2``: the form stored in the ``inputs`` column."""
    return ",".join(f"{n}@{versions[n]}" for n in tables)


def parse_inputs(text: str) -> dict[str, int]:
    return {name: int(version) for name, _, version in (part.rpartition("@") for part in text.split(",") if part)}


def gold_inputs(rt: Runtime, samples_version: int | None = None) -> str | None:
    """The ``inputs`` of the run that wrote ``samples_version`` (default: the latest gold write);
    None when no ingest recorded it."""
    ref = rt.table(LINEAGE_TABLE)
    if not delta.table_exists(rt.spark, ref):
        return None
    rows = delta.read_table(rt.spark, ref).filter("table_name = 'samples'")
    if samples_version is not None:
        rows = rows.filter(f"version = {int(samples_version)}")
    found = rows.orderBy("finished_at", ascending=False).select("inputs").limit(1).collect()
    return found[0]["inputs"] if found else None
