"""Test helpers: small real videos and a real UDP MPEG-TS sender, all made with PyAV.

Frames carry their own index: the top half is a row of ``BITS`` black/white blocks (the
binary frame number), the bottom half a solid ``COLOUR``, so a test can check order,
duplicates and RGB channel order from the decoded pixels alone.

Run as a script to send a stream (the test starts it as a subprocess)::

    python tests/helpers/streams.py send udp://127.0.0.1:PORT --frames 300 --pause-after 45 --pause-s 3
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import av.bitstream
import numpy as np

BITS = 10
COLOUR = (200, 40, 60)  # R, G, B: distinct channels catch a BGR/RGB swap


def numbered_frame(i: int, size: tuple[int, int] = (160, 128)) -> np.ndarray:
    """An RGB frame (H, W, 3) whose top half encodes ``i`` in binary blocks."""
    w, h = size
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 2:] = COLOUR
    bw = w // BITS
    for b in range(BITS):
        if (i >> (BITS - 1 - b)) & 1:
            img[: h // 2, b * bw:(b + 1) * bw] = 255
    return img


def read_number(image: np.ndarray) -> int:
    """Inverse of ``numbered_frame`` (block centres, so codec ringing at edges does not matter)."""
    h, w = image.shape[:2]
    bw = w // BITS
    n = 0
    for b in range(BITS):
        block = image[h // 8: 3 * h // 8, b * bw + bw // 4: (b + 1) * bw - bw // 4]
        n = (n << 1) | int(block.mean() > 128)
    return n


def bottom_colour(image: np.ndarray) -> np.ndarray:
    h = image.shape[0]
    return image[5 * h // 8: 7 * h // 8].reshape(-1, 3).mean(axis=0)


def make_video(path: Path, n_frames: int = 30, size: tuple[int, int] = (160, 128), fps: int = 30,
               pix_fmt: str = "yuv420p", codec: str = "libx264", gop: int = 10) -> Path:
    """Encode ``n_frames`` numbered frames; no B-frames so decode order is display order."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        stream.options = {"g": str(gop), "bf": "0", "crf": "18", "preset": "ultrafast"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, size), format="rgb24")
            frame = frame.reformat(format=pix_fmt)
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def corrupt_video(src: Path, dst: Path, every: int = 20, amount: int = 50) -> int:
    """Remux ``src`` into ``dst`` (mkv), passing every ``every``-th packet through FFmpeg's ``noise``
    bitstream filter (about 1 byte in ``amount`` flipped). The first packet (keyframe with SPS/PPS)
    is left alone. Returns how many packets were corrupted."""
    corrupted = 0
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="matroska") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        noise = av.bitstream.BitStreamFilterContext(f"noise=amount={amount}", in_stream)
        for i, packet in enumerate(inp.demux(in_stream)):
            if packet.dts is None:
                continue
            packets = [packet]
            if i % every == every // 2:
                packets = noise.filter(packet)
                corrupted += 1
            for p in packets:
                p.stream = out_stream
                out.mux(p)
    return corrupted


def free_port_pair() -> int:
    """A port P with P and P+1 free now: the user-facing API takes fixed ports, not port 0."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free pair of ports")


def wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    """A subprocess's output up to the first line starting with ``prefix`` (for the monitor: that stage has begun)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            break
    return lines


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_stream(url: str, frames: int, fps: int = 30, size: tuple[int, int] = (160, 128), gop: int = 10,
                pause_after: int | None = None, pause_s: float = 0.0) -> None:
    """Send numbered frames as H.264 in MPEG-TS to ``url`` in real time (zerolatency, short GOP so a
    receiver that (re)joins late starts within ``gop`` frames). Optionally go silent once."""
    with av.open(url, "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "bf": "0", "preset": "ultrafast", "tune": "zerolatency"}
        t0 = time.monotonic()
        for i in range(frames):
            if pause_after is not None and i == pause_after:
                time.sleep(pause_s)
                t0 += pause_s
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, size), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
            delay = t0 + (i + 1) / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for packet in stream.encode():
            out.mux(packet)


def start_sender(url: str, frames: int, pause_after: int | None = None, pause_s: float = 0.0,
                 fps: int = 30) -> subprocess.Popen:
    """``send_stream`` in another process (PyAV encoding must not share our GIL with the test)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "send", url, "--frames", str(frames), "--fps", str(fps)]
    if pause_after is not None:
        cmd += ["--pause-after", str(pause_after), "--pause-s", str(pause_s)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    send = sub.add_parser("send")
    send.add_argument("url")
    send.add_argument("--frames", type=int, default=300)
    send.add_argument("--fps", type=int, default=30)
    send.add_argument("--pause-after", type=int, default=None)
    send.add_argument("--pause-s", type=float, default=0.0)
    args = parser.parse_args()
    send_stream(args.url, args.frames, args.fps, pause_after=args.pause_after, pause_s=args.pause_s)


if __name__ == "__main__":
    _main()
