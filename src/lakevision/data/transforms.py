"""The albumentations pipelines of each task, shared by training, evaluation and serving."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import albumentations as A


def build_transform(task: str, image_size: int, train: bool, augment: bool = True, semantic: bool = False) -> A.Compose:
    """The default albumentations pipeline for a task (the model's own transform does the rest:
    torchvision detection models resize and normalize inside)."""
    import albumentations as A

    aug = [A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.3)] if train and augment else []
    if task == "classification" or semantic:
        return A.Compose([A.Resize(image_size, image_size), *aug, A.Normalize()])
    return A.Compose(
        [A.LongestMaxSize(max_size=image_size), *aug],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "ann_index"], clip=True),
    )
