"""BaseModel: one LightningModule for the three tasks around a torchvision model.

Validation reports ``val_loss`` for every task plus ``val_acc``/``val_f1`` (classification),
``val_map``/``val_map_50`` (detection and instance segmentation, COCO-exact through
:class:`lakevision.evaluation.DetectionMetrics`) or ``val_miou`` (semantic segmentation).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lakevision.data.dataset import IGNORE_INDEX
from lakevision.tasks import TRAINING_TASKS



def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _frozen_norm_train_mode(model: nn.Module) -> None:
    """Train mode for the loss branches of detection models, without moving BatchNorm statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class BaseModel(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-5,
        task: str = "classification",
        num_classes: int | None = None,
        semantic: bool = False,
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.05,
    ):
        super().__init__()
        if task not in TRAINING_TASKS:
            raise ValueError(f"task must be one of {TRAINING_TASKS}, got {task!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.task = task
        self.semantic = semantic and task == "segmentation"
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self._val_outputs: list[tuple[dict, dict]] = []
        if task == "classification" or self.semantic:
            if num_classes is None:
                raise ValueError("num_classes is required for classification and semantic segmentation")
            import torchmetrics

            if self.semantic:
                self.val_miou = torchmetrics.JaccardIndex(task="multiclass", num_classes=num_classes,
                                                          ignore_index=IGNORE_INDEX)
            else:
                self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
                self.val_f1 = torchmetrics.F1Score(task="multiclass", num_classes=num_classes, average="macro")

    @property
    def instance_task(self) -> bool:
        return self.task in ("detection", "segmentation") and not self.semantic

    # ------------------------------------------------------------------ forward and losses
    @staticmethod
    def _scaled(images) -> list[torch.Tensor]:
        """Detection inputs arrive as uint8 (cheaper to move between processes and to the GPU)."""
        return [im.float().div(255) if im.dtype == torch.uint8 else im for im in images]

    def forward(self, x):
        if self.task == "classification":
            return self.model(x)
        if self.semantic:
            return self.model(x)["out"]
        return self.model(self._scaled(x))  # eval mode: one dict of boxes/labels/scores(/masks) per image

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Targets shipped as numpy by :func:`worker_collate_fn` become tensors on this device."""
        images, targets = batch
        if isinstance(targets, list):
            targets = [{k: torch.as_tensor(v, device=self.device) for k, v in t.items()} for t in targets]
        return images, targets

    def _loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = batch
        if self.task == "classification":
            logits = self.model(images)
            return F.cross_entropy(logits, targets["label"]), {"logits": logits}
        if self.semantic:
            logits = self.model(images)["out"]
            return F.cross_entropy(logits, targets["mask"], ignore_index=IGNORE_INDEX), {"logits": logits}
        losses = self.model(self._scaled(images), list(targets))
        return sum(losses.values()), losses

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, parts = self._loss(batch)
        batch_size = len(batch[0])
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        if self.instance_task:
            for k, v in parts.items():
                self.log(f"train_{k}", v, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, targets = batch
        batch_size = len(images)
        if self.instance_task:
            # torchvision detection models return losses only in train mode
            _frozen_norm_train_mode(self.model)
            with torch.no_grad():
                loss, _ = self._loss(batch)
            self.model.eval()
            preds = self.model(self._scaled(images))
            self._val_outputs.extend(zip(
                [{k: v.detach().cpu() for k, v in p.items() if k != "masks"} for p in preds],
                [{k: v.detach().cpu() for k, v in t.items() if k != "masks"} for t in targets],
            ))
        else:
            loss, parts = self._loss(batch)
            pred = parts["logits"].argmax(1)
            if self.semantic:
                self.val_miou.update(pred, targets["mask"])
                self.log("val_miou", self.val_miou, on_epoch=True, batch_size=batch_size)
            else:
                self.val_acc.update(pred, targets["label"])
                self.val_f1.update(pred, targets["label"])
                self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=batch_size)
                self.log("val_f1", self.val_f1, on_epoch=True, batch_size=batch_size)
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.instance_task:
            return
        # DistributedSampler pads ranks to equal length by repeating images: count each image once
        outputs = list({int(t["image_id"]): (p, t) for p, t in self._gather(self._val_outputs)}.values())
        self._val_outputs = []
        if self.trainer.sanity_checking or not outputs:
            return
        from lakevision.evaluation import DetectionMetrics

        preds = [{"image_id": int(t["image_id"]), "boxes": p["boxes"].numpy(), "labels": p["labels"].numpy(),
                  "scores": p["scores"].numpy()} for p, t in outputs]
        gts = [{"image_id": int(t["image_id"]), "boxes": t["boxes"].numpy(), "labels": t["labels"].numpy()}
               for _, t in outputs]
        num_classes = int(self.hparams.num_classes or 1)
        stats = DetectionMetrics().compute_metrics(preds, gts, num_classes=num_classes)
        # every rank computes the same numbers from the gathered outputs, so no further sync
        self.log("val_map", float(max(stats["map"], 0.0)), prog_bar=True)
        self.log("val_map_50", float(max(stats["map_50"], 0.0)))

    def _gather(self, items: list) -> list:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return items
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(self.hparams.warmup_epochs * per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
