"""RayTrainer: distributed data-parallel Lightning training with Ray Train.

The driver owns the MLflow run; each Ray worker builds its datasets from plain records (no Spark
in workers), trains with ``RayDDPStrategy`` and reports a checkpoint every epoch. Rank 0 hands
its epoch metrics to the driver through a file on the shared storage (:mod:`metrics_relay`), so
no worker needs MLflow credentials. When a worker dies, Ray Train replaces the group
(``FailureConfig.max_failures``) and the loop resumes from the last reported checkpoint, logging
into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from lakevision import progress
from lakevision.config import Training
from lakevision.tasks import task_kind
from lakevision.data.dataset import COCODataset, worker_collate_fn
from lakevision.data.samples import SplitRecords
from lakevision.data.transforms import build_transform
from lakevision.tracking import FIT_SECONDS_METRIC, mlflow_client
from lakevision.training.metrics_relay import MetricsRelay, append_epoch
from lakevision.training.ray_cluster import ray_cluster

log = logging.getLogger(__name__)



class _EpochLogger(pl.Callback):
    """Rank 0 only: per-epoch metrics for the driver's MLflow run, and one progress line."""

    def __init__(self, metrics_file: str | None):
        self.metrics_file = metrics_file
        self._t0 = time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        # Lightning also keeps "<name>_step"/"<name>_epoch" copies of on_step+on_epoch metrics
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if v.numel() == 1 and not k.endswith(("_step", "_epoch"))}
        metrics["epoch_seconds"] = time.monotonic() - self._t0
        epoch = trainer.current_epoch
        progress.report(epoch_line(trainer, epoch, metrics))
        if self.metrics_file:
            append_epoch(self.metrics_file, epoch, metrics)


def epoch_line(trainer, epoch: int, metrics: dict[str, float]) -> str:
    """``epoch 3/10, 1:02 elapsed, ~3:58 left of the 5:00 budget, train_loss 0.412, val_map_50 0.523``."""
    from pytorch_lightning.callbacks import Timer

    parts = [f"epoch {epoch + 1}/{trainer.max_epochs}"]
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None:
        elapsed, left = timer.time_elapsed("train"), timer.time_remaining("train")
        parts.append(f"{progress.minutes(elapsed)} elapsed")
        if left is not None:
            parts.append(f"~{progress.minutes(left)} left of the {progress.minutes(elapsed + left)} budget")
    parts += [f"{k} {metrics[k]:.4g}" for k in sorted(metrics) if k == "train_loss" or k.startswith("val_")]
    return ", ".join(parts)


def make_loaders(cfg: dict):
    """The train and val DataLoaders of one worker (shuffled train, augmented as configured)."""
    from torch.utils.data import DataLoader

    task, data, semantic = cfg["task"], cfg["data"], cfg["semantic"]
    train: SplitRecords = cfg["train"]
    val: SplitRecords = cfg["val"]

    def make(records: SplitRecords, is_train: bool):
        ds = COCODataset(records.image_paths, records.annotations,
                         transform=build_transform(task, data["image_size"], is_train, data["augment"], semantic),
                         task=task, category_ids=train.category_ids, label_rule=data["classification_label"],
                         semantic=semantic)
        workers = data["loader_workers"]
        return DataLoader(ds, batch_size=data["batch_size"], shuffle=is_train, num_workers=workers,
                          persistent_workers=workers > 0, drop_last=False,
                          collate_fn=None if task == "classification" or semantic else worker_collate_fn)

    return make(train, True), make(val, False)


def use_scratch_dir(path: str, mp_dir: str | None = None) -> None:
    """Lightning stages each epoch's checkpoint (RayTrainReportCallback: lightning_checkpoints-*)
    and Ray downloads a checkpoint to resume from (checkpoint_tmp_*) in tempfile.gettempdir():
    this moves them under the run's storage, where the driver removes them, a killed worker's too.
    Called in the worker's own actor process, gone after training."""
    from multiprocessing import util

    # multiprocessing makes its folder (pymp-*) in the temp dir on first use and binds AF_UNIX
    # sockets there (DataLoader workers pass tensors through them): under a deep storage path the
    # socket path passes the 107-byte limit and the loader fails ("AF_UNIX path too long"). Made
    # now, it stays in ``mp_dir``, a short folder the driver removes after training (Ray kills its
    # workers, so their own exit handlers never remove it), and the loaders forked later inherit it.
    if mp_dir is not None:
        Path(mp_dir).mkdir(parents=True, exist_ok=True)
        tempfile.tempdir = mp_dir
    util.get_temp_dir()
    Path(path).mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = path


def train_loop_per_worker(cfg: dict) -> dict:
    """Runs in every Ray Train worker."""
    import ray.train
    import torch
    from pytorch_lightning.callbacks import EarlyStopping
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    opt = cfg["optimization"]
    if cfg.get("scratch_dir"):
        use_scratch_dir(cfg["scratch_dir"], cfg.get("mp_dir"))
    module = copy.deepcopy(cfg["module"])
    train_loader, val_loader = make_loaders(cfg)
    precision = opt["precision"]
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    report = RayTrainReportCallback()
    # Lightning calls on_train_epoch_end in list order: the epoch's metrics must be on disk before its
    # checkpoint is reported, or a worker killed in between resumes past an epoch the run never logged
    callbacks: list[pl.Callback] = [_EpochLogger(cfg["metrics_file"]), report]
    if opt["early_stopping_patience"]:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=opt["early_stopping_patience"]))
    trainer = pl.Trainer(
        max_epochs=opt["max_epochs"],
        max_time={"minutes": opt["max_minutes"]} if opt["max_minutes"] else None,
        accelerator="auto",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=callbacks,
        precision=precision,
        accumulate_grad_batches=opt["accumulate_grad_batches"],
        gradient_clip_val=opt["gradient_clip_val"],
        limit_train_batches=opt["limit_train_batches"],
        limit_val_batches=opt["limit_val_batches"],
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    # as_directory reads a checkpoint on shared storage in place, and removes what it had to download
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as ckpt_dir:
        ckpt_path = str(Path(ckpt_dir) / RayTrainReportCallback.CHECKPOINT_NAME) if ckpt_dir else None
        if ckpt_path:
            print(f"resuming from {ckpt_path}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
        finally:
            # the callback stages each epoch's checkpoint in the temp folder before reporting it
            shutil.rmtree(report.tmpdir_prefix, ignore_errors=True)
    if trainer.global_rank == 0 and cfg["metrics_file"]:
        # what fit() itself took, epochs and their checkpoints: the driver counts the rest as Ray's
        append_epoch(cfg["metrics_file"], trainer.current_epoch, {FIT_SECONDS_METRIC: time.monotonic() - started})
    return {"epochs": trainer.current_epoch, "resumed": ckpt_path is not None}


class RayTrainer:
    """Train a :class:`BaseModel` on Ray workers (Ray-on-Spark on a Spark cluster, else local Ray)."""

    def __init__(
        self,
        model: pl.LightningModule,
        num_workers: int = 4,
        use_gpu: bool = True,
        resources_per_worker: dict[str, float] | None = None,
        settings: Training | None = None,
    ):
        self.model = model
        self.settings = settings or Training()
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.resources_per_worker = resources_per_worker or dict(self.settings.distributed.resources_per_worker) or None

    def train(self, config: dict[str, Any]) -> dict[str, Any]:
        """Run training. ``config`` keys: ``train`` and ``val`` (:class:`SplitRecords`), and
        optionally ``storage_path`` (checkpoints; shared storage on a cluster), ``name``,
        ``tracking_uri`` + ``run_id`` (the driver's MLflow run), ``log_to_driver``.

        Returns the final metrics, per-epoch history, the best metric, the checkpoint path, the MLflow
        run id and the data version used.
        """
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        s = self.settings
        semantic = bool(getattr(self.model, "semantic", False))
        task = getattr(self.model, "task", s.task)
        kind = task_kind(task, semantic)  # its validation metric says which epoch was best; val_loss without it
        metric, mode = kind.val_metric, "max" if kind.greater_is_better else "min"
        storage = Path(config.get("storage_path") or tempfile.mkdtemp(prefix="lakevision-ckpt-")).resolve()
        name = config.get("name") or f"lakevision-{task}-{int(time.time())}"
        run_id = config.get("run_id")
        metrics_file = storage / f"{name}.metrics.jsonl" if run_id else None
        scratch = storage / f"{name}.scratch"  # the workers' temp files, removed after training
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
        # and their multiprocessing folders, which need a short path (a remote worker makes its own)
        mp_dir = tempfile.mkdtemp(prefix="lvmp-")
        try:
            loop_cfg = {
                "module": self.model, "task": task, "semantic": semantic,
                "train": config["train"], "val": config["val"],
                "data": s.data.model_dump(), "optimization": s.optimization.model_dump(),
                "metrics_file": str(metrics_file) if metrics_file else None, "scratch_dir": str(scratch),
                "mp_dir": mp_dir,
            }
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=loop_cfg,
                scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                             resources_per_worker=self.resources_per_worker),
                run_config=RunConfig(
                    name=name,
                    storage_path=str(storage),
                    failure_config=FailureConfig(max_failures=s.distributed.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                       checkpoint_score_order="min"),
                ),
            )
            relay = (MetricsRelay(metrics_file, config.get("tracking_uri"), run_id) if run_id
                     else contextlib.nullcontext())
            with ray_cluster(s.distributed, log_to_driver=config.get("log_to_driver", True)) as where, relay:
                result = trainer.fit()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(mp_dir, ignore_errors=True)
        if result.error is not None:
            raise result.error
        history = self._history(result, config.get("tracking_uri"), config.get("run_id"))
        values = history.get(metric) or history.get("val_loss") or []
        best_name = metric if history.get(metric) else "val_loss"
        best_mode = mode if history.get(metric) else "min"
        best = (max if best_mode == "max" else min)(values) if values else None
        return {
            "metrics": {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
            "metrics_history": history,
            "best_metric": {"name": best_name, "value": best, "mode": best_mode},
            "checkpoint_path": self.best_checkpoint(result, metric, mode),
            "mlflow_run_id": config.get("run_id"),
            "data_version": config["train"].version,
            "data_table": config["train"].table,
            "cluster": where,
        }

    @staticmethod
    def _history(result, tracking_uri: str | None, run_id: str | None) -> dict[str, list[float]]:
        """Per-epoch values: from the MLflow run when there is one (every epoch), else from the
        checkpoints Ray kept."""
        if run_id:
            client = mlflow_client(tracking_uri)
            history = {}
            for k in client.get_run(run_id).data.metrics:
                # an epoch a replaced worker group ran again is logged twice: its last value counts
                by_epoch = {m.step: m.value for m in sorted(client.get_metric_history(run_id, k),
                                                              key=lambda m: (m.step, m.timestamp))}
                history[k] = [by_epoch[e] for e in sorted(by_epoch)]
            return history
        rows = {int(m.get("epoch", -1)): m for _, m in result.best_checkpoints or []}
        if result.metrics:
            rows[int(result.metrics.get("epoch", -1))] = result.metrics
        history: dict[str, list[float]] = {}
        for epoch in sorted(rows):
            for k, v in rows[epoch].items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    history.setdefault(k, []).append(float(v))
        return history

    @staticmethod
    def best_checkpoint(result, metric: str, mode: str) -> str | None:
        """The kept checkpoint with the best ``metric`` (val_loss when it was not reported)."""
        kept = [(c, m) for c, m in result.best_checkpoints or [] if c is not None]
        if not kept:
            return str(Path(result.checkpoint.path) / "checkpoint.ckpt") if result.checkpoint else None
        key = metric if all(metric in m for _, m in kept) else "val_loss"
        sign = -1 if (mode == "max" and key == metric) else 1
        ckpt, _ = min(kept, key=lambda cm: sign * float(cm[1][key]))
        return str(Path(ckpt.path) / "checkpoint.ckpt")
