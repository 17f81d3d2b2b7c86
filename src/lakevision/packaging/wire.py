"""The served model's request and response names, for clients: importing them costs nothing,
where :mod:`lakevision.packaging.pyfunc` brings torch and MLflow (2.7 s of a first query)."""

from __future__ import annotations

import base64

IMAGE_COLUMN = "image"
FEATURES_COLUMN = "features"  # the per-image feature record of a response (ServingSpec.feature_output)
EMBEDDING_KEY = "embedding"


def encode_image(data: bytes) -> str:
    """What a client sends: the file's bytes, base64-encoded."""
    return base64.b64encode(data).decode("ascii")
