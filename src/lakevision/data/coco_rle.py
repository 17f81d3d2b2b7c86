"""Check a COCO run-length encoding before pycocotools sees it.

pycocotools trusts its input: a negative size or count overflows, a malformed compressed string is
read past its end, and a size of ``[2**40, 2**40]`` is accepted until a mask is allocated at
training time. :func:`rle_problem` accepts exactly the RLEs that decode to a ``size[0] x size[1]``
mask: both sides at least 1 and at most :data:`MAX_PIXELS` pixels in all, every run length
non-negative, the runs covering the mask exactly, and a compressed string in COCO's alphabet with
no run longer than pycocotools can read (6 characters).
"""

from __future__ import annotations

MAX_PIXELS = 1 << 28  # 16384 x 16384: a run length (and the difference of two) then fits in 6 characters
_MAX_CHARS = 6


def show_int(v: int) -> str:
    """An integer for a message: its digits, or its size when there are too many to read (or to
    print at all: Python refuses to format ints of over 4300 digits)."""
    return str(v) if v.bit_length() <= 128 else f"a {v.bit_length()}-bit integer"


def decode_counts(s: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``); raises
    :class:`ValueError` naming the character where it is malformed."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x = k = 0
        while True:
            if p == n:
                raise ValueError(f"ends inside a run length (character {p})")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {p} ({s[p]!r}) is not in the RLE alphabet ('0' to 'o')")
            x |= (c & 0x1F) << (5 * k)
            p += 1
            k += 1
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << (5 * k)
                break
            if k == _MAX_CHARS:
                raise ValueError(f"a run length longer than {_MAX_CHARS} characters ends at character {p}")
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_problem(size: list[int], counts: list[int] | str) -> tuple[str, str] | None:
    """None when the RLE decodes to a ``size`` mask; else ``(field, why)``, field being
    ``size`` or ``counts``."""
    if len(size) != 2:
        return "size", f"expected [height, width], got {len(size)} numbers"
    h, w = size
    if h < 1 or w < 1 or h * w > MAX_PIXELS:
        return "size", f"{show_int(h)}x{show_int(w)} is not a mask size (sides >= 1, at most {MAX_PIXELS} pixels)"
    if isinstance(counts, str):
        try:
            counts = decode_counts(counts)
        except ValueError as exc:
            return "counts", str(exc)
    if any(c < 0 for c in counts):
        return "counts", f"a negative run length ({show_int(min(counts))})"
    total = sum(counts)
    if total != h * w:
        return "counts", f"the runs cover {show_int(total)} pixels, the {h}x{w} mask has {h * w}"
    return None
