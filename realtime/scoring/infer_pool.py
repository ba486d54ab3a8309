"""Branch calls in single-thread worker processes: frame-level data parallelism on a CPU.

Why processes and not threads: an AOTInductor package's call holds the GIL for the whole
branch (measured: a pure-Python counter thread ran at 16 % of its speed while the branch
ran), so two scoring threads take turns instead of running side by side; and one branch with
two OpenMP threads loses a third of its speed whenever the capture process takes one of the
two cores (a parallel region waits for its slowest thread). Two single-thread processes each
keep a core busy and a preempted one delays only its own frame (docs/STREAMING.md, "Inference
workers").

The scorer process keeps everything that must see frames in order (field of view, routing,
alert logic, publishing); a worker only runs ``branch(tensor) → (anomaly map, score)``. Each
worker has one input and one output buffer in shared memory and a pipe for the few bytes of
each request and reply; one frame in flight per worker.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing import connection, shared_memory
from typing import Any

import numpy as np
import torch

from engine.errors import CemdError


@dataclass
class InferenceResult:
    worker: int
    score: float | None = None
    amap: torch.Tensor | None = None  # 1×1×h×w, a private copy
    error: str | None = None


def _worker_main(conn: Any, bundle_path: str, backends: dict[str, tuple[str, str]], device: str,
                 in_name: str, out_name: str, size: int) -> None:
    torch.set_num_threads(1)
    try:
        from realtime.scoring.frame_scorer import FrameScorer

        # the scorer process built and parity-checked these artifacts a moment ago: load, never build
        scorer = FrameScorer.branches_only(bundle_path, backends, device)
        shm_in = shared_memory.SharedMemory(in_name)
        shm_out = shared_memory.SharedMemory(out_name)
    except Exception as exc:  # noqa: BLE001 — reported to the scorer, which stops with the reason
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    x = torch.from_numpy(np.ndarray((1, 3, size, size), np.float32, buffer=shm_in.buf))
    out = np.ndarray((size * size,), np.float32, buffer=shm_out.buf)
    try:
        for modality in scorer.branches:  # warm: the first calls allocate
            for _ in range(2):
                scorer.run_branch(modality, torch.zeros(1, 3, size, size).to(device))
        conn.send(("ready", None))
        while True:
            try:
                modality = conn.recv()
            except EOFError:
                break
            if modality is None:
                break
            try:
                amap, score = scorer.run_branch(modality, x.to(device).contiguous())
                a = amap[0, 0].float().cpu().numpy()
                out[: a.size] = a.ravel()
                conn.send(("ok", score, a.shape))
            except Exception as exc:  # noqa: BLE001 — one bad frame is the scorer's to count
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        del x, out
        shm_in.close()
        shm_out.close()


class InferencePool:
    """``workers`` processes, each with every branch the monitor uses, one frame in flight each."""

    def __init__(self, bundle_path: str, backends: dict[str, tuple[str, str]], device: str, workers: int,
                 input_size: int) -> None:
        """``backends``: modality → (backend, precision) exactly as the scorer process loaded them."""
        if workers < 2:
            raise CemdError(f"an inference pool needs at least 2 workers, got {workers}")
        self.workers = workers
        self.size = input_size
        self._args = (bundle_path, backends, device)
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._shm: list[tuple[shared_memory.SharedMemory, shared_memory.SharedMemory]] = []
        self._inputs: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []
        self._busy: set[int] = set()

    def start(self, timeout: float = 180.0) -> None:
        """Spawn the workers and wait until every one has loaded and warmed its branches."""
        ctx = mp.get_context("spawn")
        n = self.size * self.size * 4
        try:
            for _ in range(self.workers):
                shm_in = shared_memory.SharedMemory(create=True, size=3 * n)
                shm_out = shared_memory.SharedMemory(create=True, size=n)
                self._shm.append((shm_in, shm_out))
                self._inputs.append(np.ndarray((3, self.size, self.size), np.float32, buffer=shm_in.buf))
                self._outputs.append(np.ndarray((self.size * self.size,), np.float32, buffer=shm_out.buf))
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name="cemd-inference",
                                   args=(theirs, *self._args, shm_in.name, shm_out.name, self.size), daemon=True)
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(ours)
            deadline = time.monotonic() + timeout
            waiting = set(range(self.workers))
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CemdError(f"{len(waiting)} of {self.workers} inference workers were not ready after "
                                    f"{timeout:.0f} s")
                for i in list(waiting):
                    if self._conns[i].poll(min(left, 0.1)):
                        kind, detail = self._recv(i)
                        if kind != "ready":
                            raise CemdError(f"inference worker {i} could not load the branches: {detail}")
                        waiting.discard(i)
        except BaseException:
            self.close()
            raise

    def _recv(self, i: int) -> tuple:
        try:
            return self._conns[i].recv()
        except (EOFError, OSError):
            self._procs[i].join(timeout=1)
            raise CemdError(f"inference worker {i} exited (code {self._procs[i].exitcode})") from None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def free(self) -> int:
        return self.workers - len(self._busy)

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    def submit(self, modality: str, tensor: torch.Tensor) -> int:
        """Hand one 1×3×S×S frame to a free worker; returns the worker's index."""
        i = next(k for k in range(self.workers) if k not in self._busy)
        np.copyto(self._inputs[i], tensor.numpy()[0] if tensor.dim() == 4 else tensor.numpy())
        try:
            self._conns[i].send(modality)
        except OSError:
            raise CemdError(f"inference worker {i} exited (code {self._procs[i].exitcode})") from None
        self._busy.add(i)
        return i

    def check(self) -> None:
        """Raise CemdError if a worker has died, busy or not. ``collect`` notices a worker that dies in
        the middle of a frame; a worker that dies while idle (a light load keeps it idle for long:
        the first free worker gets every frame) is only noticed here. Cheap: one non-blocking
        ``waitpid`` per worker."""
        for i, proc in enumerate(self._procs):
            if proc.exitcode is not None and not (i in self._busy and self._conns[i].poll()):
                raise CemdError(f"inference worker {i} exited (code {proc.exitcode})")

    def collect(self, timeout: float) -> list[InferenceResult]:
        """Results that arrived within ``timeout`` seconds (none waited for when nothing is in flight);
        raises CemdError when a worker died."""
        if not self._busy:
            return []
        busy = {self._conns[i]: i for i in self._busy}
        sentinels = {self._procs[i].sentinel: i for i in self._busy}
        ready = connection.wait([*busy, *sentinels], timeout)
        out: list[InferenceResult] = []
        for obj in ready:
            i = busy.get(obj)
            if i is None:  # a sentinel: the worker is gone, unless its last reply is still in the pipe
                i = sentinels[obj]
                if i in self._busy and not self._conns[i].poll():
                    raise CemdError(f"inference worker {i} exited (code {self._procs[i].exitcode}) "
                                    f"in the middle of a frame")
                continue
            if i not in self._busy:
                continue
            reply = self._recv(i)
            self._busy.discard(i)
            if reply[0] == "ok":
                h, w = reply[2]
                amap = torch.from_numpy(self._outputs[i][: h * w].copy().reshape(1, 1, h, w))
                out.append(InferenceResult(i, score=reply[1], amap=amap))
            else:
                out.append(InferenceResult(i, error=str(reply[1])))
        return out

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._inputs.clear()
        self._outputs.clear()
        for shm_in, shm_out in self._shm:
            for shm in (shm_in, shm_out):
                shm.close()
                shm.unlink()
        self._procs, self._conns, self._shm, self._busy = [], [], [], set()
