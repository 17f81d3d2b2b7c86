"""The ingest step: COCO annotations and images into the Delta tables."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lakevision.jobs.base import WrappedResult, Step, common_arguments, job_runtime

if TYPE_CHECKING:
    from lakevision.data.ingest import IngestResult


class IngestStepResult(WrappedResult):
    result: IngestResult

    def task_values(self) -> dict[str, Any]:
        r = self.result
        return {"ingest_run_id": r.run_id, "samples_version": r.tables["samples"]["version"],
                "table_versions": {k: t["version"] for k, t in r.tables.items()},
                "quarantined": sum(r.quarantine_by_reason.values()), "insufficient": r.insufficient}

    def summary(self) -> list[str]:
        r = self.result
        lines = [f"ingest run {r.run_id} finished in {r.seconds:.1f} s", f"{'table':<12} {'version':>7} {'rows':>9}  location"]
        lines += [f"{name:<12} {t['version']:>7} {t['rows']:>9}  {t['location']}" for name, t in r.tables.items()]
        if r.quarantine_by_reason:
            lines.append("quarantined records by reason:")
            lines += [f"  {code:<20} {n}" for code, n in r.quarantine_by_reason.items()]
        else:
            lines.append("no record was quarantined")
        lines.append("objects per category (train/val/test): "
                     + ", ".join(f"{name} {c['train']}/{c['val']}/{c['test']}" for name, c in r.category_counts.items()))
        lines += [f"WARNING too little data: {w}" for w in r.insufficient]
        return lines



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, help="COCO instances JSON file")
    p.add_argument("--images", required=True, help="folder with the image files")
    common_arguments(p)


def run(args: argparse.Namespace) -> IngestStepResult:
    from lakevision.data.ingest import run_ingest

    with job_runtime(args) as rt:
        return IngestStepResult(run_ingest(rt, args.annotations, args.images, progress=not args.json))


STEP = Step("ingest", "COCO annotations + images -> Delta tables", add_arguments, run)
