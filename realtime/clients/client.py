"""MonitorClient: a subscriber that loses no alert it could recover, and says so when it can't.

PUB/SUB drops silently when a subscriber falls behind. Every message carries
``(publisher_id, boot_id, seq)`` per topic, so the client sees each gap, fetches the
missed alerts from the publisher's durable log over REQ/ROUTER, and hands them over in
seq order before the message that revealed the gap. Heartbeats reveal a lost *last*
alert; a new boot_id means the publisher restarted, which is not a gap.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.errors import CemdError
from realtime.publish.keys import load_keypair, load_public_key
from realtime.publish.schema import (
    REPLAY_MAX_REPLY,
    TOPICS,
    SchemaError,
    check_schema_version,
    decode,
    replay_endpoint_for,
    validate,
)

MAX_MESSAGE_BYTES = 1 << 20  # a SUB message larger than this is not ours: libzmq drops the peer
# The SUB socket's connection events, read by the client (a dead connection is made again) and by WatchedClient's
# diagnosis. libzmq allows one monitor per socket, so MonitorClient owns it and keeps the events it read.
SUB_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
              | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# libzmq retries a lost connection at once (CONNECT_RETRIED, then every reconnect_ivl), but never after a protocol
# error such as a message over MAX_MESSAGE_BYTES: one hostile frame would leave us deaf for good. A disconnect with
# no retry after this long is such a one, and the client connects again itself.
REVIVE_AFTER_S = 1.0
MAX_REPLAY_ROUNDS = 64  # replies followed per fetch while "more" is true: a hostile endless "more" must not hang us


@dataclass(frozen=True)
class CurveClientConfig:
    """This client's ``NAME.key_secret`` (holds both its keys) and the monitor's public ``.key`` file."""

    secret_key_file: Path
    server_key_file: Path


class MonitorClient:
    """Receives decoded monitor messages in order, with missed alerts replayed and counted."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topics: tuple[str, ...] = TOPICS,
        curve: CurveClientConfig | None = None,
        rcvhwm: int = 10_000,
        replay_timeout_s: float = 1.0,
        history: bool = False,
        rcvbuf: int | None = None,
    ) -> None:
        """``history=True``: on first contact also fetch the alerts the current boot sent before we joined.
        ``rcvbuf``: kernel receive buffer in bytes (None = the OS's autotuned default)."""
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint or replay_endpoint_for(endpoint)
        self.topics = tuple(topics)
        unknown = [t for t in self.topics if t not in TOPICS]
        if unknown:
            raise CemdError(f"unknown topic(s) {', '.join(unknown)}; the monitor publishes {', '.join(TOPICS)}")
        self.replay_timeout_s = replay_timeout_s
        self.history = history
        self._keys = None
        if curve is not None:
            public, secret = load_keypair(curve.secret_key_file, "client secret")
            self._keys = (public, secret, load_public_key(curve.server_key_file, "monitor (server) public"))
        # Counters for dashboards and alarms.
        self.gaps = 0  # alert gaps detected (by seq or by heartbeat)
        self.replayed = 0  # alerts recovered from the publisher's log
        self.unrecovered = 0  # alerts known missed that replay could not supply
        self.replay_failures = 0  # replay requests that timed out or were refused
        self.boot_changes = 0  # publisher restarts seen
        self.schema_errors = 0  # garbage or another schema major: skipped
        self.last_schema_error: str | None = None  # why the last one was skipped
        self.duplicates = 0  # repeated seqs (late-joiner status re-sends): skipped
        self.lost: collections.Counter[str] = collections.Counter()  # non-alert messages missed, per topic
        self.revived = 0  # connections libzmq dropped for good (a protocol error, e.g. an oversized message), made again
        self.connection_events: collections.deque[int] = collections.deque(maxlen=10_000)  # unread SUB events

        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.rcvhwm = rcvhwm
        if rcvbuf is not None:
            self._sub.rcvbuf = rcvbuf
        self._sub.maxmsgsize = MAX_MESSAGE_BYTES
        self._sub.linger = 0
        self._sub.reconnect_ivl_max = 5000
        self._secure(self._sub)
        for topic in self.topics:
            self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._events: zmq.Socket | None = self._sub.get_monitor_socket(SUB_EVENTS)  # before connect: none missed
        self._dropped_at: float | None = None
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)
        self._sub.connect(endpoint)
        self._req: zmq.Socket | None = None
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._expected: dict[tuple[str, str, str], int] = {}
        self._boot: dict[str, str] = {}
        self._old_boots: set[tuple[str, str]] = set()
        self._last_message = time.monotonic()

    def recv(self, timeout_s: float | None = 1.0) -> dict[str, Any] | None:
        """The next message (replayed alerts first, flagged ``_replayed``), or None after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._pending:
            self.watch_connection()
            wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._dropped_at is not None:  # wake when a dropped connection is due to be made again
                due = max(0.0, self._dropped_at + REVIVE_AFTER_S - time.monotonic())
                wait_s = due if wait_s is None else min(wait_s, due)
            ready = dict(self._poller.poll(None if wait_s is None else wait_s * 1000))
            if self._sub not in ready:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            frames = self._sub.recv_multipart(zmq.NOBLOCK)
            try:
                message = decode(frames)
            except SchemaError as exc:
                self.schema_errors += 1
                self.last_schema_error = str(exc)
                continue
            self._last_message = time.monotonic()
            self._accept(message)
        return self._pending.popleft()

    def watch_connection(self) -> None:
        """Read the SUB socket's connection events (kept in ``connection_events``); connect again if libzmq gave up."""
        while self._events is not None and self._events.poll(0):
            try:
                event = recv_monitor_message(self._events, zmq.NOBLOCK)["event"]
            except (zmq.ZMQError, ValueError, KeyError):
                break
            self.connection_events.append(event)
            if event == zmq.EVENT_DISCONNECTED:
                self._dropped_at = time.monotonic()
            elif event & (zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED):
                self._dropped_at = None  # libzmq is reconnecting by itself
        if self._dropped_at is not None and time.monotonic() - self._dropped_at >= REVIVE_AFTER_S:
            self._dropped_at = None
            self.revived += 1
            try:
                self._sub.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass
            self._sub.connect(self.endpoint)  # the SUB sends its subscriptions again on the new connection

    def silent_for_s(self) -> float:
        """Seconds since the last valid message of any topic; over 3 heartbeat intervals is an alarm."""
        return time.monotonic() - self._last_message

    def close(self) -> None:
        if self._events is not None:
            try:
                self._sub.disable_monitor()
            except zmq.ZMQError:
                pass
            self._events.close(linger=0)
            self._events = None
        self._sub.close(linger=0)
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None
        self._ctx.term()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sequencing
    def _accept(self, message: dict[str, Any]) -> None:
        publisher, boot, topic, seq = message["publisher_id"], message["boot_id"], message["topic"], message["seq"]
        known = self._boot.get(publisher)
        base = message.get("alert_seq_base", 0)  # a restart on the same run folder continues its alert seqs
        base = base if isinstance(base, int) and not isinstance(base, bool) and base >= 0 else 0
        if known is None:
            self._boot[publisher] = boot
            if self.history and "alert" in self.topics:
                self._expected[(publisher, boot, "alert")] = base
        elif boot != known:
            if (publisher, boot) in self._old_boots:
                self.duplicates += 1  # a straggler from before the restart
                return
            self.boot_changes += 1
            self._recover_previous_boot(publisher, known)
            self._old_boots.add((publisher, known))
            self._boot[publisher] = boot
            for name in self.topics:  # a restart: this boot's seqs start at 0, its alerts at alert_seq_base
                self._expected[(publisher, boot, name)] = base if name == "alert" else 0

        key = (publisher, boot, topic)
        expected = self._expected.setdefault(key, seq)
        if seq < expected:
            self.duplicates += 1
            return
        if seq > expected:
            if topic == "alert":
                self._fill_gap(publisher, boot, since=expected - 1, upto=seq - 1)
            else:
                self.lost[topic] += seq - expected
        self._expected[key] = seq + 1
        if topic == "heartbeat" and "alert" in self.topics:
            self._check_last_alert(message)
        self._pending.append(message)

    def _check_last_alert(self, heartbeat: dict[str, Any]) -> None:
        """Alerts go out before the heartbeat on the same socket, so an unseen seq ≤ last_seq was lost."""
        last = heartbeat.get("last_seq", {}).get("alert")
        if not isinstance(last, int) or isinstance(last, bool):
            return
        key = (heartbeat["publisher_id"], heartbeat["boot_id"], "alert")
        expected = self._expected.setdefault(key, last + 1)  # first contact: earlier alerts predate us
        if last >= expected:
            self._fill_gap(heartbeat["publisher_id"], heartbeat["boot_id"], since=expected - 1, upto=last)
            self._expected[key] = last + 1

    def _recover_previous_boot(self, publisher: str, old_boot: str) -> None:
        """Alerts the old boot sent after the last one we saw are in the log; fetch them before moving on."""
        expected = self._expected.get((publisher, old_boot, "alert"))
        if expected is None:
            return
        missed = self._fetch(publisher, old_boot, since=expected - 1, upto=None)
        if missed:
            self.gaps += 1
            self._deliver_replayed(missed, since=expected - 1, upto=None)

    def _fill_gap(self, publisher: str, boot: str, since: int, upto: int) -> None:
        self.gaps += 1
        alerts = self._fetch(publisher, boot, since, upto)
        delivered = self._deliver_replayed(alerts, since, upto)
        self.unrecovered += (upto - since) - delivered

    def _deliver_replayed(self, alerts: list[dict[str, Any]], since: int, upto: int | None) -> int:
        delivered = 0
        last = since
        for alert in sorted(alerts, key=lambda m: m["seq"]):
            if alert["seq"] <= last or (upto is not None and alert["seq"] > upto):
                continue
            alert["_replayed"] = True
            self._pending.append(alert)
            last = alert["seq"]
            delivered += 1
        self.replayed += delivered
        return delivered

    # ------------------------------------------------------------------ replay (REQ/ROUTER)
    def _fetch(self, publisher: str, boot: str, since: int, upto: int | None) -> list[dict[str, Any]]:
        """Logged alerts of ``boot`` with since < seq (≤ upto), asking again while the reply says ``more``."""
        alerts: list[dict[str, Any]] = []
        for _ in range(MAX_REPLAY_ROUNDS):
            if upto is not None and since >= upto:
                break
            reply = self._request({"since_seq": since, "boot_id": boot})
            if reply is None or reply.get("publisher_id") != publisher or not isinstance(reply.get("alerts"), list):
                self.replay_failures += 1
                break
            chunk = []
            for alert in reply["alerts"]:
                try:
                    validate(alert, "alert")
                except SchemaError:
                    self.schema_errors += 1
                    continue
                if alert["boot_id"] == boot and alert["seq"] > since:
                    chunk.append(alert)
            alerts.extend(chunk)
            if reply.get("more") is not True or not chunk:
                break
            since = max(alert["seq"] for alert in chunk)
        else:  # still "more" after MAX_REPLAY_ROUNDS replies: a broken or hostile server; what came is kept
            self.replay_failures += 1
        return alerts

    def _request(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """One REQ round trip; a REQ that timed out is stuck mid-exchange, so it is replaced."""
        try:
            if self._req is None:
                self._req = self._ctx.socket(zmq.REQ)
                self._req.linger = 0
                self._req.maxmsgsize = REPLAY_MAX_REPLY  # a larger reply drops the connection: a failed replay
                self._secure(self._req)
                self._req.connect(self.replay_endpoint)  # a bad endpoint: a failed replay, not a crash
            self._req.send(json.dumps(request).encode())
            if self._req.poll(self.replay_timeout_s * 1000):
                frames = self._req.recv_multipart()
                if len(frames) != 1:
                    return None  # a reply is one JSON frame
                reply = json.loads(frames[0].decode("utf-8"))
                if isinstance(reply, dict) and "error" not in reply:
                    check_schema_version(reply.get("schema"))
                    return reply
                return None
        except (zmq.ZMQError, ValueError, RecursionError):  # SchemaError is a ValueError; deep nesting recurses
            pass
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None
        return None

    def _secure(self, sock: zmq.Socket) -> None:
        if self._keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self._keys
