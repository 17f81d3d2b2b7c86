"""The bundle's job steps: one module each, one :class:`~lakevision.jobs.base.Step` per module.

``lakevision <step>`` runs a step from the command line; the notebooks in ``jobs/`` run it as a
Databricks notebook task (:func:`lakevision.jobs.notebook.run_notebook_step`), the only task type
whose task values reach downstream tasks.
"""

from __future__ import annotations

from lakevision.jobs import deploy, evaluate, gate, ingest, monitor, score, train
from lakevision.jobs.base import Step, StepResult

STEPS: dict[str, Step] = {m.STEP.name: m.STEP for m in (ingest, train, evaluate, gate, deploy, monitor, score)}

__all__ = ["STEPS", "Step", "StepResult"]
