"""A virtual X server and screenshots of it, for the window tests and bench/overlay_screens.py."""

from __future__ import annotations

import os
import struct
import subprocess

import numpy as np


def start_xvfb(screen: str = "640x480x24") -> tuple[subprocess.Popen, int]:
    """A virtual X server on a display number it picks itself (``-displayfd``: no clash with a server
    already running, and it writes the number only once it accepts clients)."""
    import tempfile

    read_fd, write_fd = os.pipe()
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server must never block on it
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", screen, "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=errors)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()  # "" at EOF: Xvfb exited without a screen
    if not number.isdigit():
        xvfb.kill()
        xvfb.wait(timeout=10)
        errors.seek(0)
        raise AssertionError(f"Xvfb did not start: {errors.read().decode(errors='replace')[-500:]}")
    errors.close()
    return xvfb, int(number)


def read_xwd(data: bytes) -> np.ndarray:
    """An RGB array from an `xwd` dump (24- or 32-bit ZPixmap TrueColor, what Xvfb gives)."""
    h = struct.unpack(">25I", data[:100])
    header_size, bpp, bytes_per_line, ncolors, width, height = h[0], h[11], h[12], h[19], h[4], h[5]
    byte_order = h[7]
    nb = bpp // 8  # packed pixels; rows padded to bytes_per_line
    assert bpp in (24, 32) and bytes_per_line >= width * nb, f"unexpected {bpp} bits per pixel"
    start = header_size + 12 * ncolors
    rows = np.frombuffer(data[start:start + bytes_per_line * height], np.uint8).reshape(height, bytes_per_line)
    px = rows[:, : width * nb].reshape(height, width, nb)
    masks = (h[14], h[15], h[16])
    shift = {0xFF0000: 2, 0xFF00: 1, 0xFF: 0}  # byte index in a little-endian pixel
    idx = [shift[m] for m in masks]
    if byte_order == 1:  # MSBFirst
        idx = [nb - 1 - i for i in idx]
    return np.stack([px[..., i] for i in idx], axis=-1)


def screenshot(display: int, window: str | None = None) -> np.ndarray:
    """The screen (or the window titled ``window``) of X display ``:display`` as RGB."""
    cmd = ["xwd", "-silent", "-display", f":{display}"] + (["-name", window] if window else ["-root"])
    return read_xwd(subprocess.run(cmd, capture_output=True, timeout=20, check=True).stdout)
