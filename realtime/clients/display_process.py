"""The overlay display as a child process of the monitor (`run_stream.py --overlay window|file`).

Its life: started while the model loads (so that it is ready for the first frame), handed the
capture ring's name once the capture runs, watched (a display that dies mid-run is a lasting
fault), and stopped at the end, when it shows what is left in the ring and writes its summary.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from realtime.config import DisplaySection, RunConfig


def local_endpoint(endpoint: str) -> str:
    """A bind endpoint (``tcp://*:PORT``, ``tcp://0.0.0.0:PORT``) as a client on this machine connects to it."""
    return endpoint.replace("://*:", "://127.0.0.1:").replace("://0.0.0.0:", "://127.0.0.1:")


class DisplayProcess:
    """``python -m realtime.clients.display ENDPOINT --ring -`` with its stdin as the control line."""

    def __init__(self, run: RunConfig, look: DisplaySection, endpoint: str, run_dir: Path,
                 log: Callable[[str], None], warn: Callable[[str], None]) -> None:
        self.mode = run.overlay
        self.summary_path = run_dir / "display.json"
        self.out = Path(run.overlay_out) if run.overlay_out else run_dir / "overlay.mp4"
        self.warn = warn
        cmd = self.command(run, look, endpoint, run_dir)
        log(f"starting the overlay display ({self.mode}{': ' + str(self.out) if self.mode == 'file' else ''}) …")
        self.proc: subprocess.Popen | None = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
        self.lost: str | None = None  # why it is gone mid-run (the run stays degraded)

    @staticmethod
    def command(run: RunConfig, look: DisplaySection, endpoint: str, run_dir: Path) -> list[str]:
        """The display's command line for this run's [run] and [display] settings."""
        out = Path(run.overlay_out) if run.overlay_out else run_dir / "overlay.mp4"
        cmd = [sys.executable, "-m", "realtime.clients.display", local_endpoint(endpoint), "--ring", "-",
               "--output", run.overlay, "--summary", str(run_dir / "display.json")]
        if run.overlay == "file":
            cmd += ["--out", str(out)]
        if run.overlay_max_width:
            cmd += ["--max-width", str(run.overlay_max_width)]
        cmd += ["--opacity", str(look.opacity), "--max-result-age", str(look.max_result_age_s)]
        cmd.append("--heatmap" if look.heatmap else "--no-heatmap")
        if look.debug:
            cmd.append("--debug-overlay")
        if look.draw_log:
            cmd += ["--draw-log", str(look.draw_log)]
        if look.cue:
            cmd += ["--cue", look.cue]
        return cmd

    def hand_ring(self, ring_name: str) -> None:
        """Give the display the ring's name and wait (≤ 15 s) until it holds the ring, so that it
        sees the first frame before the scorer lets the capture reuse that slot."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{ring_name}\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            if ready and proc.stdout.readline().strip() == "ready":
                return
            self.warn("the overlay display did not attach to the capture ring within 15 s; scoring goes on")
        except OSError:
            self.warn(f"the overlay display exited early (code {proc.poll()}); scoring goes on")

    def check(self) -> str | None:
        """Why the display is gone, once it has died mid-run: the doctor's screen lost its overlay,
        even though alerts still reach every subscriber. None while it runs."""
        if self.proc is not None and not self.lost and self.proc.poll() is not None:
            self.lost = (f"the overlay display exited (code {self.proc.returncode}): no overlay on screen; "
                         f"alerts are still published to subscribers")
        return self.lost

    def stop(self) -> dict[str, Any] | None:
        """Close its stdin (the run is over): it shows what is left in the ring, writes its summary
        and exits; returns that summary (None if it wrote none)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.warn("the overlay display did not finish within 30 s and was killed")
        if self.summary_path.exists():
            return json.loads(self.summary_path.read_text())
        if proc.returncode:
            self.warn(f"the overlay display exited with code {proc.returncode}")
        return None
