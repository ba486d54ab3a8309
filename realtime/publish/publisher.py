"""AlertPublisher: the monitor's ZeroMQ side, run by one thread that owns every socket.

Why one thread: pyzmq sockets are not thread-safe, and the heartbeat must keep beating
while the caller's thread is blocked in inference. The caller hands messages over an
inproc PUSH/PULL pipe (as JSON bytes, so the caller may reuse its dicts at once). The
thread stamps them (seq, boot_id, clocks), records alerts durably before sending them,
answers "alerts since seq N" replays, re-sends the last status to late joiners, and logs
rejected CURVE handshakes as security events. See docs/SCHEMA.md.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from engine.errors import CemdError, shown
from realtime.publish.alert_log import AlertLog
from realtime.publish.keys import load_keypair
from realtime.publish.schema import (
    DEFAULT_ENDPOINT,
    PIPELINE_TOPICS,
    REPLAY_MAX_REPLY,
    SCHEMA,
    dumps,
    encode,
    plain,
    replay_endpoint_for,
)

ZAP_DOMAIN = "cemd"
REPLAY_CHUNK = 256  # alerts per replay reply; the client asks again while "more" is true
REPLAY_MAX_REQUEST = 64 * 1024
REPLAY_PER_WAKE = 100  # requests answered before heartbeats and alerts get their turn again (a flood can't starve them)
CLOSE_LINGER_MS = 100  # bounded: lets the last messages leave without ever hanging close()
_STOP = b"\x00stop"
# A client key the allow folder lacks (AUTH); a peer without CURVE or with a wrong server key
# (PROTOCOL); a peer that hung up mid-handshake, which such a peer also does at times (NO_DETAIL).
_REJECTED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


@dataclass(frozen=True)
class CurveServerConfig:
    """The monitor's own secret key file and the folder of client public keys it admits."""

    secret_key_file: Path
    allowed_clients_dir: Path


class SecurityAudit:
    """Rejected handshakes → a count and ``security.log`` lines.

    It doubles as the ZAP authenticator's logger, the only place that sees a rejected
    client's key and address (the socket monitor event that follows has neither). A
    rejected peer may retry every 100 ms, so each distinct rejection is written at
    most once a second, with the number of repeats folded into its next line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected_handshakes = 0
        self.write_errors = 0
        self._lock = threading.Lock()
        self._denials: collections.deque[str] = collections.deque(maxlen=64)
        self._last_address = ""
        self._last_write: dict[str, float] = {}
        self._repeats: collections.Counter[str] = collections.Counter()

    # --- logger interface used by zmq.auth (called in the authenticator's thread) ---
    def debug(self, msg: str, *args: Any) -> None:
        if msg.startswith("version:") and len(args) >= 4:
            self._last_address = str(args[3])
            return
        text = _format(msg, args)
        if text.startswith("DENIED"):
            with self._lock:
                self._denials.append(f"{text} address={self._last_address}")

    def error(self, msg: str, *args: Any) -> None:
        self.record(f"authenticator error: {_format(msg, args)}")

    info = warning = debug

    # --- publisher thread ---
    def handshake_rejected(self, event: dict[str, Any]) -> None:
        self.rejected_handshakes += 1
        name = zmq.Event(event["event"]).name
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            code = f"ZAP status {event['value']}"
            with self._lock:
                detail = self._denials.popleft() if self._denials else "no ZAP detail"
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            code, detail = f"protocol error {event['value']:#x}", "peer without CURVE or with a wrong server key"
        else:
            code, detail = f"errno {event['value']}", "peer hung up during the handshake"
        endpoint = event["endpoint"].decode() if isinstance(event["endpoint"], bytes) else event["endpoint"]
        self.record(f"handshake rejected ({name}, {code}) on {endpoint}: {detail}", kind=f"{name} {detail}")

    def record(self, text: str, kind: str | None = None) -> None:
        """Append one line; with ``kind``, at most one line a second for that kind of event."""
        now = time.monotonic()
        with self._lock:
            if kind is not None:
                if now - self._last_write.get(kind, -1e9) < 1.0:
                    self._repeats[kind] += 1
                    return
                if len(self._last_write) > 1000:
                    self._last_write.clear()
                self._last_write[kind] = now
                repeats = self._repeats.pop(kind, 0)
                if repeats:
                    text += f" (repeated {repeats} more times since its previous line)"
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {text}\n")
            except OSError:
                self.write_errors += 1


def _format(msg: str, args: tuple[Any, ...]) -> str:
    args = tuple(a.decode("ascii", "replace") if isinstance(a, bytes) else a for a in args)
    try:
        return msg % args if args else msg
    except (TypeError, ValueError):
        return f"{msg} {args!r}"


class AlertPublisher:
    """Publishes alert/score/status messages and 1 Hz heartbeats; records alerts; serves replays."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        replay_endpoint: str | None = None,
        *,
        run_dir: Path,
        publisher_id: str | None = None,
        heartbeat_interval: float = 1.0,
        curve: CurveServerConfig | None = None,
        state_provider: Callable[[], dict[str, Any]] | None = None,
        sndhwm: int = 10_000,
        sndbuf: int | None = None,
    ) -> None:
        """``sndhwm`` (messages per subscriber before XPUB drops) and ``sndbuf`` (kernel send buffer,
        bytes; None = the OS's autotuned default) are lowered only by tests that need loss."""
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint or replay_endpoint_for(endpoint)
        self.run_dir = Path(run_dir)
        self.publisher_id = publisher_id or f"cemd-{socket.gethostname()}"
        self.heartbeat_interval = heartbeat_interval
        self.curve = curve
        self.state_provider = state_provider
        self.sndhwm = sndhwm
        self.sndbuf = sndbuf
        self.boot_id = uuid.uuid4().hex
        self.alert_log = AlertLog(self.run_dir / "alerts.jsonl")
        self.security = SecurityAudit(self.run_dir / "security.log")
        # Counters: written by the publisher thread, read by anyone.
        self.log_errors = 0
        self.publish_refused = 0  # publish() calls refused: not started, thread dead, or outbox full
        self.bad_messages = 0
        self.state_provider_errors = 0
        self.replay_requests = 0
        self.replay_errors = 0
        self.fault: str | None = None  # set if the publisher thread died: show "AI NOT ACTIVE"
        self.last_seq = {topic: -1 for topic in PIPELINE_TOPICS + ("heartbeat",)}
        # First alert seq and event id of this boot: one past the highest in the run folder's log (start()).
        self.alert_seq_base = self.event_id_base = 0
        self.orphaned_events: list[dict[str, Any]] = []  # events a previous boot on this folder left open

        self._ctx: zmq.Context | None = None
        self._auth: ThreadAuthenticator | None = None
        self._outbox: zmq.Socket | None = None
        self._outbox_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        self._delays_lock = threading.Lock()
        # The XPUB is shared with the scoring thread's direct score path (publish_score_now);
        # every use of it, from either thread, holds this lock (a full memory barrier, which is
        # what libzmq asks of a socket used from more than one thread).
        self._xpub_lock = threading.RLock()
        self._xpub: zmq.Socket | None = None
        self._publish_delays: collections.deque[float] = collections.deque(maxlen=1_000_000)
        # Publisher-thread state.
        self._next_seq = {topic: 0 for topic in self.last_seq}
        self._started_mono = 0.0
        self._pipeline_status: dict[str, Any] | None = None
        self._last_status_frames: list[bytes] | None = None
        self._boot_alerts: collections.deque[dict[str, Any]] = collections.deque(maxlen=100_000)
        self._log_fault: str | None = None
        self._last_frame_id: int | None = None

    @property
    def rejected_handshakes(self) -> int:
        return self.security.rejected_handshakes

    # ------------------------------------------------------------------ caller side
    def start(self) -> AlertPublisher:
        """Bind both sockets and start the thread; returns once bound (CemdError if a port is taken)."""
        if self._thread is not None:
            raise RuntimeError("AlertPublisher.start() called twice")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CemdError(f"cannot create the run folder {self.run_dir}: {exc.strerror}; choose a writable one") from None
        try:  # alert seqs continue the folder's log (a supervised restart): none is used twice
            last_seq, last_event_id, self.orphaned_events = self.alert_log.resume()
            self.alert_seq_base, self.event_id_base = last_seq + 1, last_event_id + 1
        except OSError as exc:
            raise CemdError(f"cannot read the alert log {self.alert_log.path}: {exc.strerror or exc}") from None
        self._next_seq["alert"], self.last_seq["alert"] = self.alert_seq_base, self.alert_seq_base - 1
        keys = self._load_curve_keys()
        self._ctx = zmq.Context()
        try:
            if self.curve is not None:
                # Before any bind: without a running ZAP handler libzmq admits every CURVE client.
                self._auth = ThreadAuthenticator(self._ctx, log=self.security)
                self._auth.start()
                self._auth.configure_curve(domain=ZAP_DOMAIN, location=str(self.curve.allowed_clients_dir))
            self._thread = threading.Thread(target=self._run, args=(keys,), name="cemd-publisher", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._start_error is not None:
                raise self._start_error
            outbox = self._ctx.socket(zmq.PUSH)
            outbox.linger = 0
            outbox.sndhwm = 100_000
            outbox.connect("inproc://outbox")
            self._outbox = outbox
        except BaseException:
            self._shutdown()
            raise
        return self

    def publish(self, topic: str, payload: dict[str, Any]) -> bool:
        """Queue one message for the publisher thread; never blocks. False if it could not be queued.

        A ``score`` payload may carry ``t_decision_mono_ns``: the publisher turns it into
        ``timings_ms.publish`` and removes it.
        """
        if topic not in PIPELINE_TOPICS:
            raise ValueError(f"topic {topic!r} cannot be published by the pipeline; use one of {PIPELINE_TOPICS}")
        if not isinstance(payload, dict):
            raise TypeError(f"a {topic} payload must be a dict, got {type(payload).__name__}")
        frames = [topic.encode(), dumps(payload)]
        with self._outbox_lock:
            if self._outbox is None or self.fault is not None:
                self.publish_refused += 1
                return False
            try:
                self._outbox.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.publish_refused += 1
                return False
        return True

    def publish_score_now(self, payload: dict[str, Any]) -> float | None:
        """Send a ``score`` message from the calling thread, right now.

        Returns the decision → sent delay in ms (None without ``t_decision_mono_ns``, or when the
        publisher is down and nothing was sent).

        Why: handing the message to the publisher thread means waiting for the OS to schedule
        that thread, which on a busy 2-core machine took up to 5–10 ms (p99). The scoring
        thread already has a core, so it sends itself, under the XPUB lock.
        """
        with self._xpub_lock:
            xpub = self._xpub
            if xpub is None or self.fault is not None:
                self.publish_refused += 1
                return None
            return self._send_score(xpub, dict(payload))

    def publish_delays_ms(self) -> list[float]:
        """Decision → send delay of every score message so far (for summaries and benchmarks)."""
        with self._delays_lock:
            return list(self._publish_delays)

    def close(self) -> None:
        """Send what is queued, stop the thread and release the ports (bounded, never hangs)."""
        with self._outbox_lock:
            if self._outbox is not None:
                try:  # after everything already queued, so those messages still go out
                    self._outbox.send(_STOP, zmq.NOBLOCK)
                except zmq.Again:
                    self._stopping.set()
        self._shutdown()

    def __enter__(self) -> AlertPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shutdown(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                self._stopping.set()
                self._thread.join(timeout=5.0)
        with self._outbox_lock:
            if self._outbox is not None:
                self._outbox.close(linger=0)
                self._outbox = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self.alert_log.close()

    def _load_curve_keys(self) -> tuple[bytes, bytes] | None:
        if self.curve is None:
            return None
        keys = load_keypair(self.curve.secret_key_file, "monitor (server) secret")
        allow = Path(self.curve.allowed_clients_dir)
        if not allow.is_dir() or not any(allow.glob("*.key")):
            raise CemdError(
                f"client key folder {allow} {'has no *.key files' if allow.is_dir() else 'does not exist'}; "
                "make each client a key pair with `cemd keys --out DIR --name CLIENT` and copy its CLIENT.key there"
            )
        return keys

    # ------------------------------------------------------------------ publisher thread
    def _run(self, keys: tuple[bytes, bytes] | None) -> None:
        sockets: list[zmq.Socket] = []
        try:
            try:
                xpub, router, pull, monitors = self._bind(keys, sockets)
            except BaseException as exc:
                self._start_error = exc
                return
            finally:
                self._ready.set()
            self._serve(xpub, router, pull, monitors)
        except Exception as exc:  # noqa: BLE001 — must become a visible fault, not a silent dead thread
            self.fault = f"publisher thread stopped: {exc!r}"
        finally:
            with self._xpub_lock:
                self._xpub = None  # the scoring thread's direct path stops here
            for sock in sockets:
                sock.close(linger=CLOSE_LINGER_MS if sock.type == zmq.XPUB else 0)

    def _bind(self, keys: tuple[bytes, bytes] | None, sockets: list[zmq.Socket]):
        assert self._ctx is not None
        pull = self._ctx.socket(zmq.PULL)
        sockets.append(pull)
        pull.rcvhwm = 100_000
        pull.bind("inproc://outbox")

        xpub = self._ctx.socket(zmq.XPUB)
        sockets.append(xpub)
        xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        xpub.sndhwm = self.sndhwm
        if self.sndbuf is not None:
            xpub.sndbuf = self.sndbuf
        xpub.linger = 0
        router = self._ctx.socket(zmq.ROUTER)
        sockets.append(router)
        router.maxmsgsize = REPLAY_MAX_REQUEST
        router.linger = 0
        monitors = []
        for sock in (xpub, router):
            if keys is not None:
                sock.curve_publickey, sock.curve_secretkey = keys
                sock.curve_server = True
                sock.zap_domain = ZAP_DOMAIN.encode()
                sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                monitor = sock.get_monitor_socket(_REJECTED)
                sockets.append(monitor)
                monitors.append(monitor)
        _bind(xpub, self.endpoint, "--publish")
        _bind(router, self.replay_endpoint, "--replay (default: the publish port + 1)")
        self._xpub = xpub
        return xpub, router, pull, monitors

    def _serve(self, xpub: zmq.Socket, router: zmq.Socket, pull: zmq.Socket, monitors: list[zmq.Socket]) -> None:
        self._started_mono = time.monotonic()
        try:
            self.alert_log.open()
        except OSError as exc:
            self._log_failed(exc)
            self._send_status(xpub, self._pipeline_status or _INITIAL_STATUS)
        poller = zmq.Poller()
        for sock in (pull, router, *monitors):
            poller.register(sock, zmq.POLLIN)
        # The XPUB is watched through its signalling fd, so this thread never holds the XPUB
        # lock while it waits; its events are re-read under the lock at every wake (≤ 100 ms),
        # as the fd only signals changes (libzmq ZMQ_FD).
        poller.register(xpub.getsockopt(zmq.FD), zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stopping.is_set():
            wait_ms = max(0.0, min(100.0, (next_beat - time.monotonic()) * 1000))
            ready = dict(poller.poll(wait_ms))
            if pull in ready and self._drain_outbox(pull, xpub):
                # a last heartbeat after everything else: its last_seq lets a client see that it
                # lost alerts sent just before the end (no later message would reveal the gap)
                self._send_heartbeat(xpub)
                return
            self._answer_subscriptions(xpub)
            if router in ready:
                self._answer_replays(router)
            for monitor in monitors:
                if monitor in ready:
                    while monitor.poll(0):
                        self.security.handshake_rejected(recv_monitor_message(monitor))
            now = time.monotonic()
            if now >= next_beat:
                self._send_heartbeat(xpub)
                next_beat = max(next_beat + self.heartbeat_interval, now)

    def _drain_outbox(self, pull: zmq.Socket, xpub: zmq.Socket) -> bool:
        """Send up to 1000 queued messages (then let heartbeats and replays in); True on the stop marker."""
        for _ in range(1000):
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if frames == [_STOP]:
                return True
            try:
                topic, payload = frames[0].decode(), json.loads(frames[1])
                if not isinstance(payload, dict):
                    raise TypeError("payload is not an object")
                if topic == "alert":
                    self._send_alert(xpub, payload)
                elif topic == "score":
                    self._send_score(xpub, payload)
                elif topic == "map":
                    self._send(xpub, self._stamp("map", payload))
                else:
                    self._pipeline_status = payload
                    self._send_status(xpub, payload)
            except (ValueError, TypeError, KeyError, AttributeError):
                self.bad_messages += 1  # a payload bug must not stop the alert stream
        return False

    def _stamp(self, topic: str, payload: dict[str, Any]) -> dict[str, Any]:
        seq = self._next_seq[topic]
        self._next_seq[topic] = seq + 1
        message: dict[str, Any] = {
            "schema": SCHEMA, "topic": topic, "publisher_id": self.publisher_id, "boot_id": self.boot_id,
            "seq": seq, "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns(),
            "alert_seq_base": self.alert_seq_base,
        }
        for key, value in payload.items():
            message.setdefault(key, value)
        return message

    def _send(self, xpub: zmq.Socket, message: dict[str, Any]) -> list[bytes]:
        frames = encode(message["topic"], message)
        with self._xpub_lock:
            try:
                xpub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                pass  # XPUB drops for a full subscriber; clients see the seq gap and replay alerts
        self.last_seq[message["topic"]] = message["seq"]
        return frames

    def _send_score(self, xpub: zmq.Socket, payload: dict[str, Any]) -> float | None:
        with self._xpub_lock:  # score seqs are stamped by this thread or by publish_score_now
            t_decision = payload.pop("t_decision_mono_ns", None)
            message = self._stamp("score", payload)
            timings = dict(message.get("timings_ms") or {})
            if isinstance(t_decision, int):
                timings["publish"] = round((time.monotonic_ns() - t_decision) / 1e6, 4)  # as of the stamp
            else:
                timings["publish"] = None
            message["timings_ms"] = timings
            if isinstance(message.get("frame_id"), int):
                self._last_frame_id = message["frame_id"]
            self._send(xpub, message)
            if not isinstance(t_decision, int):
                return None
            delay_ms = (time.monotonic_ns() - t_decision) / 1e6  # counts encoding and the send call too
            with self._delays_lock:
                self._publish_delays.append(delay_ms)
            return delay_ms

    def _send_alert(self, xpub: zmq.Socket, payload: dict[str, Any]) -> None:
        message = self._stamp("alert", payload)
        self._boot_alerts.append(message)
        try:
            self.alert_log.append(message)  # durable before anyone is told
        except OSError as exc:
            self._send(xpub, message)
            self._log_failed(exc)
            self._send_status(xpub, self._pipeline_status or _INITIAL_STATUS)
            return
        self._send(xpub, message)
        if self._log_fault is not None:
            self._log_fault = None  # recovered: say so with the pipeline's own status
            self._send_status(xpub, self._pipeline_status or _INITIAL_STATUS)

    @property
    def log_fault(self) -> str | None:
        """Why the alert log cannot be written right now (None when it can): for the dashboard."""
        return self._log_fault

    def _log_failed(self, exc: OSError) -> None:
        self.log_errors += 1
        self._log_fault = (
            f"alert log {self.alert_log.path} cannot be written ({exc.strerror or exc}); alerts are still "
            "sent but NOT recorded: free disk space or make the run folder writable"
        )

    def _send_status(self, xpub: zmq.Socket, payload: dict[str, Any]) -> None:
        if self._log_fault is not None:
            state = payload.get("state")
            message = payload.get("message") or ""
            if self._log_fault not in message:  # the monitor may already show it in its own message
                message = f"{message}; {self._log_fault}" if message else self._log_fault
            payload = {**payload, "state": "degraded" if state in ("starting", "running", None) else state,
                       "message": message}
        self._last_status_frames = self._send(xpub, self._stamp("status", payload))

    def _send_heartbeat(self, xpub: zmq.Socket) -> None:
        state = (self._pipeline_status or _INITIAL_STATUS).get("state", "starting")
        last_frame_id = self._last_frame_id
        if self.state_provider is not None:
            try:
                info = plain(self.state_provider())  # must be JSON-able, or this heartbeat can't go out
                state = info.get("state", state)
                last_frame_id = info.get("last_frame_id", last_frame_id)
            except Exception:  # noqa: BLE001 — a broken provider must not stop the heartbeat
                self.state_provider_errors += 1
                state = "degraded"
        if self._log_fault is not None and state in ("starting", "running"):
            state = "degraded"
        self._send(xpub, self._stamp("heartbeat", {
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "interval_s": self.heartbeat_interval,
            "state": state,
            "last_frame_id": last_frame_id,
            "last_seq": {topic: self.last_seq[topic] for topic in PIPELINE_TOPICS},
        }))

    def _answer_subscriptions(self, xpub: zmq.Socket) -> None:
        """Late joiner: a new subscription that covers ``status`` gets the last status at once."""
        while True:
            with self._xpub_lock:
                if not xpub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                try:
                    frames = xpub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
            event = frames[0]
            if event[:1] == b"\x01" and b"status".startswith(event[1:]) and self._last_status_frames:
                with self._xpub_lock:
                    try:
                        xpub.send_multipart(self._last_status_frames, zmq.NOBLOCK)
                    except zmq.Again:
                        pass

    def _answer_replays(self, router: zmq.Socket) -> None:
        for _ in range(REPLAY_PER_WAKE):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.replay_requests += 1
            split = frames.index(b"") + 1 if b"" in frames else 1  # REQ puts an empty delimiter
            envelope, body = frames[:split], frames[split:]
            try:
                reply = self._replay(body)
            except ValueError as exc:
                self.replay_errors += 1
                reply = {"schema": SCHEMA, "publisher_id": self.publisher_id, "error": str(exc)}
            try:
                router.send_multipart([*envelope, dumps(reply)], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.replay_errors += 1  # peer gone; nothing to answer

    def _replay(self, body: list[bytes]) -> dict[str, Any]:
        if len(body) != 1:
            raise ValueError(f"a replay request is one JSON frame, got {len(body)} frames")
        try:
            request = json.loads(body[0].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: a RecursionError would end this thread
            raise ValueError('replay request is not UTF-8 JSON; send {"since_seq": N, "boot_id": "..."}') from None
        if not isinstance(request, dict):
            raise ValueError('replay request must be a JSON object {"since_seq": N, "boot_id": "..."}')
        since = request.get("since_seq")
        boot = request.get("boot_id")
        if boot is None or boot == "":  # absent, null or empty: the current boot
            boot = self.boot_id
        if not isinstance(since, int) or isinstance(since, bool) or since < -1:
            raise ValueError(f"since_seq must be an integer >= -1, got {shown(since)}")
        if not isinstance(boot, str):
            raise ValueError(f"boot_id must be a string, got {shown(boot)}")
        if boot == self.boot_id and (not self._boot_alerts or self._boot_alerts[0]["seq"] <= since + 1):
            alerts = [m for m in self._boot_alerts if m["seq"] > since]  # includes alerts the log failed to record
        else:
            try:
                alerts = self.alert_log.read(since, boot)
            except OSError as exc:
                raise ValueError(f"alert log {self.alert_log.path} unreadable: {exc.strerror or exc}") from None
        chunk, size = [], 4096  # room for the reply's own fields
        for alert in alerts[:REPLAY_CHUNK]:  # and at most REPLAY_MAX_REPLY bytes, which the client accepts
            size += len(dumps(alert)) + 1
            if size > REPLAY_MAX_REPLY and chunk:
                break
            chunk.append(alert)
        return {
            "schema": SCHEMA, "publisher_id": self.publisher_id, "boot_id": self.boot_id, "replay_boot_id": boot,
            "alerts": chunk, "more": len(alerts) > len(chunk),
        }


_INITIAL_STATUS: dict[str, Any] = {"state": "starting", "source": None, "scorer": None, "open_events": [], "message": None}


def _bind(sock: zmq.Socket, endpoint: str, option: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        transport, _, address = endpoint.partition("://")
        host, _, port = address.rpartition(":")
        if exc.errno == zmq.EADDRINUSE:
            raise CemdError(
                f"port {port} on {host} is in use (another monitor running?); choose another with "
                f"{option} {transport}://{host}:PORT"
            ) from None
        raise CemdError(f"cannot bind {endpoint}: {exc.strerror}; check {option} (e.g. tcp://127.0.0.1:5556)") from None
