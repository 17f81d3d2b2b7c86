"""Property-based tests of the inputs a hostile caller controls: the serving payload decoder and
the config loader's overrides. The only outcomes allowed are success or the project's own error
(a 400 for the decoder, a ConfigError for the loader): never another exception, never a hang.

Derandomized, with no example database: the same examples on every run and nothing left behind.
"""

from __future__ import annotations

import base64
import io
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from PIL import Image

from lakevision.config import load_config
from lakevision.config.loader import ConfigError
from lakevision.packaging.pyfunc import SUPPORTED_FORMATS, ServingSpec, decode_images

from .conftest import CONFIG_DIR

PROPERTY = settings(derandomize=True, database=None, max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SPEC = ServingSpec("classification", False, 32, [1, 2], ["a", "b"], max_image_pixels=64 * 64,
                   max_batch_size=8, max_request_pixels=4 * 64 * 64, architecture="resnet18")


def _image_file(fmt: str, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, fmt)
    return buf.getvalue()


# real files (inside and beyond the limits), cut short, and with bytes flipped: what a decoder
# meets when a client, a proxy or an attacker gets the encoding wrong
_FILES = st.builds(_image_file, st.sampled_from([*SUPPORTED_FORMATS, "GIF", "TIFF", "ICO"]),
                   st.integers(1, 90), st.integers(1, 90))


@st.composite
def _damaged(draw) -> bytes:
    data = bytearray(draw(_FILES))
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


_TEXTS = st.one_of(
    st.builds(lambda b: base64.b64encode(b).decode(), st.one_of(_FILES, _damaged(), st.binary(max_size=300))),
    st.text(max_size=50),
    st.none(), st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3),
)


@PROPERTY
@given(st.lists(_TEXTS, min_size=1, max_size=6))
def test_the_payload_decoder_answers_images_or_a_400(texts):
    try:
        decoded = decode_images(texts, SPEC)
    except MlflowException as exc:
        assert exc.get_http_status_code() == 400 and exc.message.startswith("row"), exc.message
        return
    assert len(decoded) == len(texts)
    assert sum(d.width * d.height for d in decoded) <= SPEC.max_request_pixels
    for d in decoded:
        assert d.array.dtype == np.uint8 and d.array.ndim == 3 and d.array.shape[2] == 3


_KEYS = st.one_of(
    st.sampled_from(["training.optimization.learning_rate", "training.epochs", "deployment.canary.smoke_requests",
                     "deployment.monitoring.drift.ks_alpha", "data.processing.max_image_size",
                     "deployment.metrics_threshold", "training.task", "no.such.key", "training", ""]),
    st.text(alphabet=string.ascii_letters + "._[]0", max_size=30),
)
_VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0.5", "1e400", "nan", "true", "null", "[1,", "{a: 1", "'", "!!python/object:os.system",
                     "[" * 60 + "]" * 60, "{accuracy: 2}", "classification", "\x00", "9" * 40]),
    st.text(max_size=40),
)


@PROPERTY
@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=3))
def test_config_overrides_load_or_raise_a_config_error(pairs):
    try:
        load_config(CONFIG_DIR, "local", [f"{k}={v}" for k, v in pairs])
    except ConfigError:
        pass


@pytest.mark.parametrize("override", ["deployment.canary.smoke_requests=[1,", "training=!!python/object:os.system"])
def test_unparsable_override_values_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(CONFIG_DIR, "local", [override])
