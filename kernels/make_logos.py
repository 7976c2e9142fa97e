"""Draw the kernel's logos (kernels/nbchat/logo-32x32.png, logo-64x64.png): a speech bubble.

Run once when the design changes (``python kernels/make_logos.py``); the PNGs are committed. Plain
Python (zlib + struct), so it needs no imaging library: each pixel is the coverage of a 4x4 grid of
samples, which gives smooth edges at 32 px.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

BUBBLE = (33, 110, 214)  # blue
DOTS = (255, 255, 255)
SAMPLES = 4


def _inside_rounded_rect(
    x: float, y: float, left: float, top: float, right: float, bottom: float, radius: float
) -> bool:
    cx = min(max(x, left + radius), right - radius)
    cy = min(max(y, top + radius), bottom - radius)
    return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2 and left <= x <= right and top <= y <= bottom


def _inside_tail(x: float, y: float) -> bool:
    """The bubble's tail: a triangle under its lower left part (unit square coordinates)."""
    ax, ay, bx, by, cx, cy = 0.22, 0.70, 0.46, 0.70, 0.16, 0.94
    d1 = (x - bx) * (ay - by) - (ax - bx) * (y - by)
    d2 = (x - cx) * (by - cy) - (bx - cx) * (y - cy)
    d3 = (x - ax) * (cy - ay) - (cx - ax) * (y - ay)
    negative = d1 < 0 or d2 < 0 or d3 < 0
    positive = d1 > 0 or d2 > 0 or d3 > 0
    return not (negative and positive)


def _color_at(x: float, y: float) -> tuple[int, int, int, int]:
    """RGBA of one sample in unit square coordinates."""
    for center in (0.30, 0.50, 0.70):
        if (x - center) ** 2 + (y - 0.42) ** 2 <= 0.065**2:
            return (*DOTS, 255)
    if _inside_rounded_rect(x, y, 0.06, 0.10, 0.94, 0.74, 0.16) or _inside_tail(x, y):
        return (*BUBBLE, 255)
    return (0, 0, 0, 0)


def draw(size: int) -> bytes:
    """The logo as RGBA rows, ``size`` x ``size``."""
    rows = bytearray()
    for row in range(size):
        rows.append(0)  # PNG filter type 0 (none) for this row
        for column in range(size):
            total = [0, 0, 0, 0]
            for sub_y in range(SAMPLES):
                for sub_x in range(SAMPLES):
                    x = (column + (sub_x + 0.5) / SAMPLES) / size
                    y = (row + (sub_y + 0.5) / SAMPLES) / size
                    r, g, b, a = _color_at(x, y)
                    total = [total[0] + r * a, total[1] + g * a, total[2] + b * a, total[3] + a]
            alpha = total[3]
            if alpha:
                rows.extend(round(channel / alpha) for channel in total[:3])
            else:
                rows.extend((0, 0, 0))
            rows.append(round(alpha / SAMPLES**2))
    return bytes(rows)


def png(size: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(draw(size), 9))
        + chunk(b"IEND", b"")
    )


if __name__ == "__main__":
    target = Path(__file__).resolve().parent / "nbchat"
    for size in (32, 64):
        (target / f"logo-{size}x{size}.png").write_bytes(png(size))
