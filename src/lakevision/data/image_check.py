"""Open, hash and fully decode image files on the Spark workers.

:func:`check_partition` is the ``mapInPandas`` function: it runs where the files are (a UC Volume
on Databricks, the local disk under Sail). PIL releases the GIL while decoding, so Sail's UDF
threads use every core even though they share one Python process.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator

import pandas as pd
from PIL import Image, UnidentifiedImageError

CHECK_SCHEMA = (
    "id long, path string, file_exists boolean, byte_size long, sha256 string, "
    "decoded_width int, decoded_height int, format string, mode string, "
    "exif_orientation int, decode_error string"
)
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def check_file(path: str) -> dict:
    """Everything ingest needs to know about one file; never raises."""
    out: dict = {"path": path, "file_exists": False, "byte_size": None, "sha256": None,
                 "decoded_width": None, "decoded_height": None, "format": None, "mode": None,
                 "exif_orientation": None, "decode_error": None}
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return out
    except OSError as exc:  # present but unreadable (a directory, no permission): not "missing"
        out.update(file_exists=True, decode_error=f"cannot read: {exc.strerror or exc}")
        return out
    out.update(file_exists=True, byte_size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated or corrupt pixel data fails here, not at training time
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
            w, h = im.size
            if orientation in _SWAPS_AXES:
                w, h = h, w
            out.update(decoded_width=w, decoded_height=h, format=im.format, mode=im.mode, exif_orientation=orientation)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        out["decode_error"] = f"{type(exc).__name__}: {exc}"
    return out


def make_checker(image_dir: str):
    """The ``mapInPandas`` function for files under ``image_dir`` (columns ``id``, ``file_name``)."""

    def check_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            for image_id, name in zip(batch["id"].tolist(), batch["file_name"].tolist()):
                row = check_file(os.path.join(image_dir, name))
                row["id"] = image_id
                rows.append(row)
            frame = pd.DataFrame(rows, columns=[c.split()[0] for c in CHECK_SCHEMA.split(", ")])
            yield frame.astype({"decoded_width": "Int32", "decoded_height": "Int32", "exif_orientation": "Int32",
                                "byte_size": "Int64"})

    return check_partition
