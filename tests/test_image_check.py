"""Per-file checks that run inside the Spark UDF."""

from __future__ import annotations

import hashlib
import io

import pandas as pd
from PIL import Image

from lakevision.data.image_check import check_file, make_checker


def _save(path, img, fmt, **kw):
    img.save(path, format=fmt, **kw)
    return str(path)


def test_good_jpeg(tmp_path):
    p = _save(tmp_path / "a.jpg", Image.new("RGB", (120, 80), (9, 9, 9)), "JPEG")
    r = check_file(p)
    assert r["file_exists"] and r["decode_error"] is None
    assert (r["decoded_width"], r["decoded_height"], r["format"], r["mode"]) == (120, 80, "JPEG", "RGB")
    data = open(p, "rb").read()
    assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["byte_size"] == len(data)


def test_modes_are_recorded(tmp_path):
    assert check_file(_save(tmp_path / "g.png", Image.new("L", (50, 40)), "PNG"))["mode"] == "L"
    assert check_file(_save(tmp_path / "r.png", Image.new("RGBA", (50, 40)), "PNG"))["mode"] == "RGBA"


def test_exif_rotation_swaps_reported_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    r = check_file(_save(tmp_path / "e.jpg", Image.new("RGB", (120, 80)), "JPEG", exif=exif))
    assert (r["decoded_width"], r["decoded_height"], r["exif_orientation"]) == (80, 120, 6)


def test_missing_truncated_garbage_and_directory(tmp_path):
    assert check_file(str(tmp_path / "none.jpg"))["file_exists"] is False
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    r = check_file(str(tmp_path / "t.jpg"))
    assert r["file_exists"] and "truncated" in r["decode_error"]
    (tmp_path / "x.jpg").write_bytes(b"certainly not an image")
    assert "UnidentifiedImageError" in check_file(str(tmp_path / "x.jpg"))["decode_error"]
    (tmp_path / "d.jpg").mkdir()
    r = check_file(str(tmp_path / "d.jpg"))
    assert r["file_exists"] and r["decode_error"].startswith("cannot read")


def test_checker_yields_typed_frames(tmp_path):
    _save(tmp_path / "a.jpg", Image.new("RGB", (10, 20)), "JPEG")
    out = list(make_checker(str(tmp_path))(iter([pd.DataFrame({"id": [1, 2], "file_name": ["a.jpg", "b.jpg"]})])))
    frame = out[0]
    assert frame["id"].tolist() == [1, 2]
    assert frame["decoded_width"].tolist()[0] == 10 and pd.isna(frame["decoded_width"].tolist()[1])
