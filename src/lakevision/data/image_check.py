"""Open, hash and fully decode image files on the Spark workers.

:func:`check_partition` is the ``mapInPandas`` function: it runs where the files are (a UC Volume
on Databricks, the local disk under Sail). PIL releases the GIL while decoding, so Sail's UDF
threads use every core even though they share one Python process.

The file names come from the annotation file, so they are untrusted: only regular files inside the
image folder are read, at most :func:`max_file_bytes` of them (see :mod:`lakevision.data.confined`),
and an image whose header already says it is larger than ``max_image_size`` is not decoded. One bad
file is one row's problem, never the batch's.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator

import pandas as pd
from PIL import Image

from lakevision.data.confined import RefusedFile, read_confined

CHECK_SCHEMA = (
    "id long, path string, file_exists boolean, byte_size long, sha256 string, "
    "decoded_width int, decoded_height int, format string, mode string, "
    "exif_orientation int, decode_error string, refused string"
)
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_INT32_MAX = 2**31 - 1
MIN_FILE_BYTES = 64 * 2**20


def max_file_bytes(max_side: int | None) -> int:
    """The most bytes read of one image file: an uncompressed 16-bit RGBA image (8 bytes a pixel)
    of ``max_side`` squared, and never under 64 MiB (room for metadata, thumbnails and profiles)."""
    return max(MIN_FILE_BYTES, 8 * (max_side or 0) ** 2)


def _orientation(im: Image.Image) -> int:
    value = im.getexif().get(_EXIF_ORIENTATION, 1)
    if value in (0, None):  # 0 means "unknown" (some cameras write it): shown as stored
        return 1
    if type(value) is not int or not 1 <= value <= 8:
        raise ValueError(f"EXIF Orientation {value!r:.40} is not one of 1-8")
    return value


def check_file(image_dir: str, file_name: str, max_side: int | None = None, max_bytes: int = MIN_FILE_BYTES) -> dict:
    """Everything ingest needs to know about ``image_dir/file_name``; never raises.

    ``refused`` says why the name was not opened at all: it leaves the folder, is not a regular
    file or is over ``max_bytes``. An image whose header is larger than ``max_side`` on its
    longer side is reported with its header size and not decoded.
    """
    out: dict = {"path": os.path.join(image_dir, file_name), "file_exists": False, "byte_size": None,
                 "sha256": None, "decoded_width": None, "decoded_height": None, "format": None, "mode": None,
                 "exif_orientation": None, "decode_error": None, "refused": None}
    try:
        data = read_confined(image_dir, file_name, max_bytes)
    except RefusedFile as exc:
        out["refused"] = f"file_name {file_name!r:.300} {exc}"
        return out
    except FileNotFoundError:
        return out
    except OSError as exc:  # present but unreadable (no permission): not "missing"
        out.update(file_exists=True, decode_error=f"cannot read: {exc.strerror or exc}")
        return out
    out.update(file_exists=True, byte_size=len(data), sha256=hashlib.sha256(data).hexdigest())
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
            if max(w, h) > _INT32_MAX:
                raise ValueError(f"header size {w}x{h} is out of range")
            if max_side is not None and max(w, h) > max_side:
                # too large whichever way it is turned: not decoded, nor its EXIF read (a PNG's follows the pixels)
                out.update(decoded_width=w, decoded_height=h, format=im.format, mode=im.mode)
                return out
            orientation = _orientation(im)
            if orientation in _SWAPS_AXES:
                w, h = h, w
            out.update(decoded_width=w, decoded_height=h, format=im.format, mode=im.mode, exif_orientation=orientation)
            im.load()  # a full decode: truncated or corrupt pixel data fails here, not at training time
    except Exception as exc:  # PIL's plugins raise many kinds (struct.error, IndexError, ...): one row's problem
        out["decode_error"] = f"{type(exc).__name__}: {exc}"
    return out


def make_checker(image_dir: str, max_side: int | None = None):
    """The ``mapInPandas`` function for files under ``image_dir`` (columns ``id``, ``file_name``);
    ``max_side`` is ``max_image_size``: larger images are not decoded, and it sets the byte cap."""
    max_bytes = max_file_bytes(max_side)

    def check_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            for image_id, name in zip(batch["id"].tolist(), batch["file_name"].tolist()):
                row = check_file(image_dir, name, max_side, max_bytes)
                row["id"] = image_id
                rows.append(row)
            frame = pd.DataFrame(rows, columns=[c.split()[0] for c in CHECK_SCHEMA.split(", ")])
            yield frame.astype({"decoded_width": "Int32", "decoded_height": "Int32", "exif_orientation": "Int32",
                                "byte_size": "Int64"})

    return check_partition
