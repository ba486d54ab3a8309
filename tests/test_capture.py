"""Capture: real files, a real UDP MPEG-TS stream and a real spawned capture process."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from engine.errors import CemdError
from realtime.capture.process import CaptureProcess, Frame
from realtime.capture.ring import FrameRing
from realtime.capture.sources import SourceSpec, open_reader, parse_source, synthetic_events
from tests.helpers.streams import COLOUR, bottom_colour, corrupt_video, free_udp_port, make_video, read_number, start_sender


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    make_video(out / "n60.mp4", 60)
    make_video(out / "n200.mp4", 200)
    make_video(out / "n10.mp4", 10)
    corrupt_video(out / "n200.mp4", out / "noisy.mkv", every=20)
    return out


def _my_rings() -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"cemd_ring_{os.getpid()}_*")]


def _drain(cap: CaptureProcess, timeout: float = 5.0, sleep_s: float = 0.0) -> list[Frame]:
    frames = []
    while (frame := cap.next_frame(timeout)) is not None:
        frames.append(frame)
        if sleep_s:
            time.sleep(sleep_s)
    return frames


def _wait_for(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# ------------------------------------------------------------------------- files


def test_fast_file_is_lossless_in_order_then_ended(videos: Path) -> None:
    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=False, slots=3) as cap:
        assert cap.mode == "lossless"
        frames = _drain(cap)
        assert [f.frame_id for f in frames] == list(range(60))
        assert [read_number(f.image) for f in frames] == list(range(60))
        assert [f.seq for f in frames] == list(range(1, 61))
        img = frames[7].image
        assert img.shape == (128, 160, 3) and img.dtype == np.uint8 and img.flags.writeable
        assert np.allclose(bottom_colour(img), COLOUR, atol=10)  # RGB, not BGR
        assert frames[1].pts is not None and frames[1].time_base is not None
        assert cap.ended
        stats = cap.stats()
        assert stats["state"] == "ended" and stats["frames_read"] == 60 and stats["frames_dropped"] == 0
        assert (stats["width"], stats["height"]) == (160, 128)
        assert [e.state for e in cap.poll_events()] == ["opening", "running", "ended"]
    assert _my_rings() == []


def test_zero_copy_frames_are_lossless_and_released(videos: Path) -> None:
    """copy=False lends the ring slot itself; lossless mode keeps it until release()."""
    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=False, slots=2) as cap:
        numbers = []
        while (f := cap.next_frame(timeout=10, copy=False)) is not None:
            assert not f.image.flags.writeable
            time.sleep(0.005)  # the writer is ahead and must wait for this slot
            numbers.append(read_number(f.image))
            assert cap.release(f)
        assert numbers == list(range(60))
        stats = cap.stats()
        assert stats["frames_dropped"] == 0 and stats["frames_read"] == 60


def test_zero_copy_frame_lapped_by_a_live_writer_is_reported(videos: Path) -> None:
    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=True, slots=2) as cap:
        f = cap.next_frame(timeout=10, copy=False)
        assert f is not None
        # until the writer has put three more frames into the 2-slot ring: f's slot was overwritten
        assert _wait_for(lambda: cap.stats()["frames_read"] >= f.frame_id + 4), cap.stats()
        assert cap.release(f) is False
        delivered = _drain(cap)
        stats = cap.stats()
    assert stats["frames_read"] == stats["frames_dropped"] + len(delivered)


def test_paced_file_with_slow_consumer_drops_oldest(videos: Path) -> None:
    t0 = time.monotonic()
    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=True) as cap:
        assert cap.mode == "live"
        frames = _drain(cap, sleep_s=0.07)  # 70 ms per frame against a 33 ms frame period
        stats = cap.stats()
    elapsed = time.monotonic() - t0
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids)) and ids[-1] == 59
    assert stats["frames_read"] == 60
    assert stats["frames_dropped"] > 10
    assert stats["frames_read"] == stats["frames_dropped"] + len(frames)
    assert all(read_number(f.image) == f.frame_id for f in frames)
    assert elapsed > 1.7  # 60 frames at 30 fps are paced over ~2 s


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (a bound, not a sleep that must be long enough)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _ages_ms(cap: CaptureProcess, fresh: float, work_s: float, n: int) -> list[float]:
    """Take ``n`` frames like a scorer that works ``work_s`` per frame; each frame's age when taken."""
    ages = []
    while len(ages) < n and (frame := cap.next_frame(5.0, fresh=fresh)) is not None:
        ages.append((time.monotonic_ns() - frame.t_capture_mono_ns) / 1e6)
        time.sleep(work_s)
    return ages


def test_fresh_wait_takes_the_next_frame_instead_of_a_stale_one(videos: Path) -> None:
    # a consumer that needs 45 ms a frame against a 33 ms period: without waiting, the newest
    # frame is anywhere from 0 to 33 ms old when it looks; with fresh=0.3 it waits for the next
    # one whenever the newest is older than 10 ms, so the frames it takes are all fresh
    with CaptureProcess(parse_source(str(videos / "n200.mp4")), realtime=True) as cap:
        cap.next_frame(5.0)
        assert _wait_for(lambda: cap.stats()["fps"] > 0)  # three arrivals: the period is measured
        fresh = _ages_ms(cap, 0.3, 0.045, 40)
        stale = _ages_ms(cap, 0.0, 0.045, 40)
        stats = cap.stats()
    assert stats["state"] == "running"  # 200 frames at 30 fps: still playing
    assert len(fresh) == 40 and len(stale) == 40
    # relative, in one run: how fresh the frames are in ms depends on the machine's load; its
    # absolute figure is measured by bench/ (docs/BENCHMARKS.md, "Frame freshness")
    assert np.median(stale) > np.median(fresh), (sorted(stale), sorted(fresh))
    assert stats["frames_dropped"] > 20  # the stale frames it passed over are counted


def test_loop_restarts_with_increasing_frame_ids(videos: Path) -> None:
    cap = CaptureProcess(parse_source(str(videos / "n10.mp4")), realtime=False, loop=True)
    try:
        cap.start()
        frames = [cap.next_frame(5) for _ in range(25)]
        assert [f.frame_id for f in frames] == list(range(25))
        assert [read_number(f.image) for f in frames] == [i % 10 for i in range(25)]
        assert cap.stats()["loops"] >= 2
    finally:
        cap.stop()


@pytest.mark.parametrize("codec,pix_fmt,ext", [
    ("libx264", "yuv422p10le", "mp4"),  # H.264 High 4:2:2 10-bit
    ("ffv1", "gray", "mkv"),
    ("ffv1", "gray10le", "mkv"),
])
def test_pixel_formats_decode_to_rgb(tmp_path: Path, codec: str, pix_fmt: str, ext: str) -> None:
    import av

    path = make_video(tmp_path / f"v.{ext}", 12, codec=codec, pix_fmt=pix_fmt)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == pix_fmt
    reader = open_reader(parse_source(str(path)))
    try:
        frames = []
        while (f := reader.read()) is not None:
            frames.append(f)
    finally:
        reader.close()
    assert [read_number(f.image) for f in frames] == list(range(12))
    img = frames[3].image
    assert img.shape == (128, 160, 3) and img.dtype == np.uint8
    colour = bottom_colour(img)
    if pix_fmt.startswith("gray"):
        assert np.ptp(colour) < 3  # R == G == B
    else:
        assert np.allclose(colour, COLOUR, atol=10)


def test_ten_bit_file_through_capture(tmp_path: Path) -> None:
    path = make_video(tmp_path / "p10.mp4", 8, pix_fmt="yuv422p10le")
    with CaptureProcess(parse_source(str(path)), realtime=False) as cap:
        frames = _drain(cap)
    assert [read_number(f.image) for f in frames] == list(range(8))


def test_corrupted_packets_are_skipped(videos: Path) -> None:
    with CaptureProcess(parse_source(str(videos / "noisy.mkv")), realtime=False) as cap:
        frames = _drain(cap)
        stats = cap.stats()
    assert stats["state"] == "ended"
    assert stats["decode_errors"] > 0
    assert len(frames) >= 150  # of 200, with every 20th packet corrupted
    assert len({read_number(f.image) for f in frames}) >= 120


# ------------------------------------------------------------------------- network


def test_udp_stream_stall_and_recovery() -> None:
    port = free_udp_port()
    url = f"udp://127.0.0.1:{port}"
    # 30 fps; silent for 3 s after frame 60 (~2 s in); 2.5 s more after the pause
    sender = start_sender(url, frames=135, pause_after=60, pause_s=3.0)
    try:
        spec = parse_source(url + "?overrun_nonfatal=1&fifo_size=100000")
        with CaptureProcess(spec, realtime=False, open_timeout=3, read_timeout=2, stall_after_s=1.0) as cap:
            assert cap.mode == "live"  # network is always latest-wins
            states: list[str] = []
            numbers: list[int] = []
            end = time.monotonic() + 12
            while time.monotonic() < end and sender.poll() is None:
                frame = cap.next_frame(0.2)
                if frame is not None:
                    numbers.append(read_number(frame.image))
                states += [e.state for e in cap.poll_events()]
            states += [e.state for e in cap.poll_events()]
            stats = cap.stats()
    finally:
        sender.kill()
        sender.wait()
    assert "stalled" in states
    stalled_at = states.index("stalled")
    assert "running" in states[stalled_at:], states
    assert any(n < 60 for n in numbers) and any(n > 70 for n in numbers)  # before and after the pause
    assert stats["frames_read"] > 40
    assert _my_rings() == []


def test_unreachable_udp_fails_at_start_quickly() -> None:
    url = f"udp://127.0.0.1:{free_udp_port()}"
    t0 = time.monotonic()
    cap = CaptureProcess(parse_source(url), open_timeout=1.0)
    with pytest.raises(CemdError, match="no video from udp://127.0.0.1.*sender is running"):
        cap.start()
    assert time.monotonic() - t0 < 6
    assert not cap.alive and _my_rings() == []


def test_refused_rtsp_fails_at_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cap = CaptureProcess(parse_source(f"rtsp://127.0.0.1:{port}/live"), open_timeout=1.0)
    with pytest.raises(CemdError, match="connection refused"):
        cap.start()


# ------------------------------------------------------------------------- bad input


def test_bad_files_fail_at_start_with_clear_message(tmp_path: Path) -> None:
    noise = tmp_path / "random.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    t0 = time.monotonic()
    with pytest.raises(CemdError, match="random.mp4.*not a readable video file"):
        CaptureProcess(parse_source(str(noise))).start()
    assert time.monotonic() - t0 < 5


def test_bad_inputs_rejected_in_process(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 200)
    with pytest.raises(CemdError, match="text file, not a video"):
        open_reader(parse_source(str(text)))
    with pytest.raises(CemdError, match="holds no video frames|has no video stream"):
        _audio_only(tmp_path / "a.wav")
    with pytest.raises(CemdError, match="unknown URL scheme 'foo'; use rtsp, udp, rtp, srt, http"):
        parse_source("foo://x/y")
    with pytest.raises(CemdError, match="does not exist"):
        parse_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(CemdError, match="could not open camera device:63"):
        open_reader(parse_source("device:63"))
    with pytest.raises(CemdError, match="is a folder"):
        parse_source(str(tmp_path))
    with pytest.raises(CemdError, match="size must look like 640x480"):
        parse_source("synthetic:size=big")
    with pytest.raises(CemdError, match="bad synthetic option 'colour=red'"):
        parse_source("synthetic:colour=red")


def _audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in [*stream.encode(frame), *stream.encode()]:
            out.mux(p)
    open_reader(parse_source(str(path)))


def test_parse_source_kinds() -> None:
    assert parse_source("rtsp://cam/x").kind == "network"
    assert parse_source("UDP://1.2.3.4:5000").scheme == "udp"
    dev = parse_source("/dev/video2")
    assert (dev.kind, dev.device_index, dev.is_live) == ("device", 2, True)
    assert parse_source("device:0").device_index == 0
    syn = parse_source("synthetic:seed=3,seconds=5,size=320x240,fps=25")
    assert (syn.kind, syn.seed, syn.seconds, syn.size, syn.fps) == ("synthetic", 3, 5.0, (320, 240), 25.0)
    assert parse_source("synthetic").size == (640, 480)


# ------------------------------------------------------------------------- process and ring


def test_killed_child_reports_error_and_leaves_no_segment(videos: Path) -> None:
    cap = CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=True, loop=True)
    cap.start()
    assert cap.next_frame(2) is not None and cap.alive
    assert len(_my_rings()) == 1
    os.kill(cap.pid, signal.SIGKILL)
    assert _wait_for(lambda: cap.state == "error", 3)
    assert not cap.alive
    messages = [e.message for e in cap.poll_events() if e.state == "error"]
    assert messages == ["capture process died (exit code -9)"]
    cap.stop()
    cap.stop()  # idempotent
    assert _my_rings() == []


def test_sigterm_exits_cleanly(videos: Path) -> None:
    cap = CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=True, loop=True)
    cap.start()
    proc = cap._proc
    os.kill(cap.pid, signal.SIGTERM)
    # join() can return as soon as the child's sentinel closes, a moment before waitpid reports
    # the exit; keep joining until the exit code is there (still within the same 3 s).
    deadline = time.monotonic() + 3
    while proc.exitcode is None and time.monotonic() < deadline:
        proc.join(0.1)
    assert proc.exitcode == 0
    cap.stop()


def test_ring_downscales_oversize_frames_and_guards_torn_reads() -> None:
    ring = FrameRing.create(slots=2, max_bytes=100 * 80 * 3)
    try:
        other = FrameRing.attach(ring.name)
        big = np.full((160, 200, 3), 77, np.uint8)
        assert other.write(0, 1, big, 0, None, None, 1, 2) is True
        assert other.oversize_frames == 1
        image, meta = ring.read(0, expect_seq=1)
        assert image.nbytes <= 100 * 80 * 3 and image.shape[2] == 3 and (image == 77).all()
        assert meta.pts is None and meta.time_base is None and meta.frame_id == 0
        assert ring.read(0, expect_seq=2) is None and ring.torn_reads == 1
        assert ring.read(1) is None  # never written (seq 0)
        other.close()
    finally:
        ring.close()
        ring.unlink()
    assert not Path("/dev/shm", ring.name.lstrip("/")).exists()


def test_orphaned_rings_are_removed() -> None:
    orphan = Path("/dev/shm/cemd_ring_999999999_test_orphan")  # above pid_max: owner surely dead
    orphan.write_bytes(b"x")
    assert orphan.name in FrameRing.remove_orphans()
    assert not orphan.exists()


# ------------------------------------------------------------------------- synthetic


def test_synthetic_source_frames_and_events() -> None:
    spec = parse_source("synthetic:seconds=2")
    with CaptureProcess(spec, realtime=False) as cap:
        frames = [cap.next_frame(10) for _ in range(5)]
        stats = cap.stats()
    assert all(f is not None and f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.frame_id for f in frames] == [0, 1, 2, 3, 4]
    assert frames[0].image.std() > 5
    assert stats["nominal_fps"] == 30.0
    events = synthetic_events(spec)
    assert events["frames"] == 60 and events["synthetic"] is True
    assert events["modality"] and "lesions" in events
    with pytest.raises(CemdError):
        synthetic_events(SourceSpec("file", "x.mp4"))


def test_lossless_capture_keeps_frames_for_an_overlay_tap(videos: Path) -> None:
    import threading

    from realtime.clients.display import RingFeed

    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=False) as cap:
        tap = RingFeed(cap.ring_name, idle_end_s=2.0)  # attached before the consumer frees any slot
        consumed: list[Frame] = []
        consumer = threading.Thread(target=lambda: consumed.extend(_drain(cap)))
        consumer.start()
        seen = []
        while (f := tap.next(timeout=1.0)) is not None or not tap.ended:
            if f is not None:
                seen.append(f.frame_id)
                assert read_number(f.image) == f.frame_id
                time.sleep(0.01)  # a slower reader than the consumer: the writer must wait for it
        consumer.join(10)
        tap.close()
    assert seen == list(range(60)) and tap.missed == 0
    assert [f.frame_id for f in consumed] == list(range(60))


def test_a_stuck_tap_is_detached_and_never_stalls_the_analysis(videos: Path) -> None:
    from realtime.capture.ring import FrameRing

    t0 = time.monotonic()
    with CaptureProcess(parse_source(str(videos / "n60.mp4")), realtime=False) as cap:
        ring = FrameRing.attach(cap.ring_name)
        ring.tap_attach()  # and never reads: like a display that froze or was killed
        frames = _drain(cap)
        ring.close()
    assert [f.frame_id for f in frames] == list(range(60))
    assert 1.5 < time.monotonic() - t0 < 15  # it waited ~2 s once, then went on without the tap
