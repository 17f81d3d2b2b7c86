"""Per-file checks that run inside the Spark UDF."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading

import pandas as pd
import pytest
from PIL import Image, ImageFile

from lakevision.data.image_check import check_file, make_checker, max_file_bytes


def _save(path, img, fmt, **kw):
    img.save(path, format=fmt, **kw)
    return str(path.parent), path.name


def test_good_jpeg(tmp_path):
    p = _save(tmp_path / "a.jpg", Image.new("RGB", (120, 80), (9, 9, 9)), "JPEG")
    r = check_file(*p)
    assert r["file_exists"] and r["decode_error"] is None and r["refused"] is None
    assert (r["decoded_width"], r["decoded_height"], r["format"], r["mode"]) == (120, 80, "JPEG", "RGB")
    data = (tmp_path / "a.jpg").read_bytes()
    assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["byte_size"] == len(data)


def test_modes_are_recorded(tmp_path):
    assert check_file(*_save(tmp_path / "g.png", Image.new("L", (50, 40)), "PNG"))["mode"] == "L"
    assert check_file(*_save(tmp_path / "r.png", Image.new("RGBA", (50, 40)), "PNG"))["mode"] == "RGBA"


def test_exif_rotation_swaps_reported_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    r = check_file(*_save(tmp_path / "e.jpg", Image.new("RGB", (120, 80)), "JPEG", exif=exif))
    assert (r["decoded_width"], r["decoded_height"], r["exif_orientation"]) == (80, 120, 6)


def test_missing_truncated_garbage_and_directory(tmp_path):
    folder = str(tmp_path)
    assert check_file(folder, "none.jpg")["file_exists"] is False
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    r = check_file(folder, "t.jpg")
    assert r["file_exists"] and "truncated" in r["decode_error"]
    (tmp_path / "x.jpg").write_bytes(b"certainly not an image")
    assert "UnidentifiedImageError" in check_file(folder, "x.jpg")["decode_error"]
    (tmp_path / "d.jpg").mkdir()  # only regular files are opened
    r = check_file(folder, "d.jpg")
    assert not r["file_exists"] and r["refused"] == "file_name 'd.jpg' is a directory, not a regular file"


def test_checker_yields_typed_frames(tmp_path):
    _save(tmp_path / "a.jpg", Image.new("RGB", (10, 20)), "JPEG")
    out = list(make_checker(str(tmp_path))(iter([pd.DataFrame({"id": [1, 2], "file_name": ["a.jpg", "b.jpg"]})])))
    frame = out[0]
    assert frame["id"].tolist() == [1, 2]
    assert frame["decoded_width"].tolist()[0] == 10 and pd.isna(frame["decoded_width"].tolist()[1])


# --------------------------------------------------------------------------- hostile file names and files
@pytest.fixture
def layout(tmp_path):
    """An image folder with one good image, and a good image outside it that nothing may read."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (30, 20)).save(folder / "good.jpg")
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (30, 20), (200, 0, 0)).save(outside)
    (folder / "escape.jpg").symlink_to(outside)  # a symlink out of the folder
    (folder / "up").symlink_to(tmp_path, target_is_directory=True)
    (folder / "inner.jpg").symlink_to("good.jpg")  # a symlink that stays inside is followed
    return folder, outside


@pytest.mark.parametrize("name", [
    "../outside.jpg", "../../../../../../etc/hostname", "escape.jpg", "up/outside.jpg", "up/images/../outside.jpg",
    "/etc/hostname", "ABSOLUTE", "", "a\0b.jpg", ".", "../images/../../outside.jpg",
])
def test_names_that_leave_the_folder_are_refused_unread(layout, name):
    folder, outside = layout
    name = str(outside) if name == "ABSOLUTE" else name
    r = check_file(str(folder), name)
    assert r["refused"] and r["refused"].startswith("file_name ")
    assert r["sha256"] is None and r["byte_size"] is None and r["decoded_width"] is None and not r["file_exists"]


def test_symlink_inside_the_folder_is_followed(layout):
    folder, _ = layout
    r = check_file(str(folder), "inner.jpg")
    assert r["refused"] is None and r["decode_error"] is None and r["decoded_width"] == 30
    assert r["sha256"] == hashlib.sha256((folder / "good.jpg").read_bytes()).hexdigest()


def test_devices_are_never_opened(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "zero.jpg").symlink_to("/dev/zero")
    for name in ("zero.jpg", "../" * 12 + "dev/zero"):
        r = check_file(str(folder), name)
        assert r["refused"] and "outside the image folder" in r["refused"] and r["byte_size"] is None


def test_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(check_file(str(tmp_path), "pipe.jpg")), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("check_file waited for a writer on a FIFO")
    assert result["refused"] == "file_name 'pipe.jpg' is a FIFO, not a regular file"


def test_file_over_the_byte_cap_is_refused(tmp_path):
    _save(tmp_path / "a.png", Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    size = (tmp_path / "a.png").stat().st_size
    r = check_file(str(tmp_path), "a.png", max_bytes=size - 1)
    assert r["refused"] == f"file_name 'a.png' is {size} bytes, over the limit of {size - 1}"
    assert r["sha256"] is None
    assert check_file(str(tmp_path), "a.png", max_bytes=size)["sha256"] is not None
    assert max_file_bytes(2000) == 64 * 2**20 and max_file_bytes(10_000) == 8 * 10_000**2


def _exif_orientation_long(value: int) -> bytes:
    """An EXIF block whose Orientation is a LONG (PIL writes it as a SHORT, so it cannot hold 2**32 - 1)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 4, 1, value) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd


def test_bad_exif_orientation_is_one_rows_problem(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "bad.jpg", exif=_exif_orientation_long(0xFFFFFFFF))
    Image.new("RGB", (40, 30)).save(tmp_path / "zero.jpg", exif=_exif_orientation_long(0))
    _save(tmp_path / "good.jpg", Image.new("RGB", (10, 20)), "JPEG")
    batch = pd.DataFrame({"id": [1, 2, 3], "file_name": ["bad.jpg", "zero.jpg", "good.jpg"]})
    frame = next(make_checker(str(tmp_path))(iter([batch])))
    bad, zero, good = frame.to_dict("records")
    assert bad["decode_error"] == "ValueError: EXIF Orientation 4294967295 is not one of 1-8"
    assert zero["decode_error"] is None and zero["exif_orientation"] == 1  # 0 is "unknown": as stored
    assert good["decode_error"] is None and good["decoded_width"] == 10


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_large_image_is_measured_from_its_header_not_decoded(tmp_path, monkeypatch):
    _save(tmp_path / "huge.png", Image.new("L", (12000, 12000)), "PNG")  # 140 KB, 144 megapixels
    assert (tmp_path / "huge.png").stat().st_size < 200_000

    def no_decode(self):
        raise AssertionError("decoded an image its header already shows is too large")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    r = check_file(str(tmp_path), "huge.png", max_side=2000)
    assert (r["decoded_width"], r["decoded_height"], r["decode_error"]) == (12000, 12000, None)
    _save(tmp_path / "small.png", Image.new("L", (50, 40)), "PNG")  # within the limit: decoded in full
    assert "decoded an image" in check_file(str(tmp_path), "small.png", max_side=2000)["decode_error"]
