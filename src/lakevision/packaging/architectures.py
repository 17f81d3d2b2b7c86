"""torchvision model factories, one per task, with heads sized for the dataset's classes.

``weights="DEFAULT"`` starts from torchvision's pretrained weights (downloaded on first use; fine
on Databricks) and replaces the class-specific heads; ``"none"`` trains from scratch. A download
that cannot happen fails within seconds with a message saying what to set instead.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from torch import nn

from lakevision.errors import LakevisionError

_DOWNLOAD_TIMEOUT_S = 10
TORCHVISION_BOX_HEAD = 1024  # R-CNN box head width torchvision builds (TwoMLPHead representation_size)


class WeightsUnavailableError(LakevisionError, RuntimeError):
    pass


def _fetch(builder: Callable[..., nn.Module], name: str, **kwargs) -> nn.Module:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        return builder(weights="DEFAULT", **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated download a RuntimeError
        raise WeightsUnavailableError(
            f"cannot fetch pretrained weights for {name}: {exc}. "
            "Set training.model.weights: none to train from scratch."
        ) from exc
    finally:
        socket.setdefaulttimeout(old)


def classification_model(name: str, num_classes: int, weights: str = "none") -> nn.Module:
    from torchvision import models

    builder = getattr(models, name)
    if weights == "none":
        return builder(weights=None, num_classes=num_classes)
    model = _fetch(builder, name)
    if name.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif name.startswith("mobilenet_v3"):
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    elif name.startswith("convnext"):
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def _resnet18_fpn(weights: str):
    """ResNet-18 + FPN (levels P3-P5 + pool): from scratch it reached val mAP@0.5 0.48 on the
    synthetic shapes in two CPU epochs where MobileNetV3-FPN reached 0.05 (benchmarks/RESULTS.md).
    Its norm layers are frozen BatchNorm, torchvision's choice for detection backbones."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    def build(weights=None):
        return resnet_fpn_backbone(backbone_name="resnet18", weights=weights, returned_layers=[2, 3, 4],
                                   trainable_layers=5 if weights is None else 3)

    backbone = build() if weights == "none" else _fetch(build, "resnet18 (ImageNet backbone)")
    # one anchor size per level, smaller than COCO's (32-512) to suit small images
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,)), ((0.5, 1.0, 2.0),) * 4)
    return backbone, anchors


def _rcnn_budget(rois_per_image: int, rpn_proposals: int) -> dict:
    # Predicting keeps the same proposals as training: every one goes through the box head's
    # 12544x1024 layer, so torchvision's 1,000 made a 160 px image cost 305 ms on one CPU thread
    # where 300 cost 117 ms (torchvision's own 320 px MobileNet detector keeps 150).
    return {"box_batch_size_per_image": rois_per_image, "rpn_post_nms_top_n_train": rpn_proposals,
            "rpn_pre_nms_top_n_train": 2 * rpn_proposals, "rpn_post_nms_top_n_test": rpn_proposals,
            "rpn_pre_nms_top_n_test": 2 * rpn_proposals}


def _box_head(model: nn.Module, name: str, num_classes: int, size: int) -> nn.Module:
    """The R-CNN's box head at ``size`` wide with a new predictor; unchanged at torchvision's 1,024.
    On CPU the head's first layer (12544 x 1024 per RoI) cost more than the ResNet-18 backbone:
    at 256 wide a 160 px training step took 0.79 s instead of 1.16 s (benchmarks/RESULTS.md)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    head = model.roi_heads.box_head
    if size == TORCHVISION_BOX_HEAD:
        return model
    if not isinstance(head, TwoMLPHead):
        raise ValueError(f"box_head_size {size}: {name}'s box head is a {type(head).__name__}, not the two-layer "
                         f"MLP it sets; keep {TORCHVISION_BOX_HEAD} for it")
    model.roi_heads.box_head = TwoMLPHead(head.fc6.in_features, size)
    model.roi_heads.box_predictor = FastRCNNPredictor(size, num_classes)
    return model


def detection_model(name: str, num_classes: int, weights: str = "none", image_size: int = 320,
                    rois_per_image: int = 512, rpn_proposals: int = 2000,
                    box_head_size: int = TORCHVISION_BOX_HEAD) -> nn.Module:
    """``num_classes`` counts the background. The model resizes inputs to ``image_size``."""
    from torchvision.models import detection as det

    size = {"min_size": image_size, "max_size": image_size}
    if name.startswith("fasterrcnn"):
        size.update(_rcnn_budget(rois_per_image, rpn_proposals))
    if name == "fasterrcnn_resnet18_fpn":
        backbone, anchors = _resnet18_fpn(weights)
        model = det.FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **size)
        return _box_head(model, name, num_classes, box_head_size)
    builder = getattr(det, name)
    if weights == "none":
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **size)
        return _box_head(model, name, num_classes, box_head_size) if name.startswith("fasterrcnn") else model
    model = _fetch(builder, name, **size)
    if name.startswith("fasterrcnn"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
        return _box_head(model, name, num_classes, box_head_size)
    elif name.startswith("retinanet"):
        from torchvision.models.detection.retinanet import RetinaNetClassificationHead

        head = model.head.classification_head
        model.head.classification_head = RetinaNetClassificationHead(
            head.cls_logits.in_channels, head.num_anchors, num_classes
        )
    return model


def segmentation_model(name: str, num_classes: int, weights: str = "none", image_size: int = 320,
                       rois_per_image: int = 512, rpn_proposals: int = 2000,
                       box_head_size: int = TORCHVISION_BOX_HEAD) -> nn.Module:
    """Mask R-CNN (instances) or DeepLabV3 (semantic); ``num_classes`` counts the background."""
    if name.startswith("maskrcnn"):
        from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        size = {"min_size": image_size, "max_size": image_size, **_rcnn_budget(rois_per_image, rpn_proposals)}
        if name == "maskrcnn_resnet18_fpn":
            backbone, anchors = _resnet18_fpn(weights)
            model = MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **size)
        elif weights == "none":
            model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **size)
        else:
            model = _fetch(maskrcnn_resnet50_fpn, name, **size)
            model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features,
                                                              num_classes)
            model.roi_heads.mask_predictor = MaskRCNNPredictor(model.roi_heads.mask_predictor.conv5_mask.in_channels,
                                                               256, num_classes)
        return _box_head(model, name, num_classes, box_head_size)
    from torchvision.models import segmentation as seg

    builder = getattr(seg, name)
    if weights == "none":
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    model = _fetch(builder, name, aux_loss=False)
    model.classifier[-1] = nn.Conv2d(model.classifier[-1].in_channels, num_classes, 1)
    return model


def build_model(task: str, name: str, num_classes: int, weights: str = "none", image_size: int = 320,
                rois_per_image: int = 512, rpn_proposals: int = 2000,
                box_head_size: int = TORCHVISION_BOX_HEAD) -> nn.Module:
    if task == "classification":
        return classification_model(name, num_classes, weights)
    if task == "detection":
        return detection_model(name, num_classes, weights, image_size, rois_per_image, rpn_proposals, box_head_size)
    if task == "segmentation":
        return segmentation_model(name, num_classes, weights, image_size, rois_per_image, rpn_proposals,
                                  box_head_size)
    raise ValueError(f"unknown task {task!r}")
