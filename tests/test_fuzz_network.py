"""Seeded, bounded fuzz of the network doors (issue 29): the publisher's replay socket, and the subscriber's input.

Nothing may crash, nothing may hang, and every refusal is one clear line. Each door prints how many cases it
tried (``fuzz door=... cases=N``). Hang detection never sleeps: after each hostile case a valid sentinel status
message (its own publisher id) is re-sent until the client has processed it, within a deadline.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
import zmq
from rich.console import Console

from realtime.clients.client import MAX_REPLAY_ROUNDS, MonitorClient
from realtime.clients.subscribe import JsonlOutput, LiveView, Subscription, WatchedClient
from realtime.publish.publisher import REPLAY_MAX_REQUEST, AlertPublisher
from realtime.publish.schema import SCHEMA, TOPICS, encode
from tests.helpers.streams import free_port_pair

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")
SEED = 29
CASE_DEADLINE_S = 10.0  # a case the client has not got past in this long is a hang
REPLY_TIMEOUT_MS = 2000  # a replay request of an acceptable size must be answered within this
MAX_LINE = 300  # a refusal is one short line


def alert_payload(event_id: int, frame_id: int = 7) -> dict[str, Any]:
    return {"event": "start", "event_id": event_id, "modality": "nbi", "frame_id": frame_id, "pts": None,
            "start_frame_id": frame_id, "end_frame_id": None, "score": 0.91, "peak_score": 0.93,
            "peak_frame_id": frame_id, "threshold": 0.5, "duration_ms": 0.0,
            "location": {"box": [10, 20, 30, 40], "contour": [[10, 20], [40, 20], [40, 60]], "peak": [25, 40]}}


def message(topic: str, publisher: str, boot: str, seq: Any, **fields: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "topic": topic, "publisher_id": publisher, "boot_id": boot, "seq": seq,
            "t_wall_ns": time.time_ns(), "t_mono_ns": time.monotonic_ns(), **fields}


def junk_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of a hostile kind (NaN and Infinity go out as the non-standard tokens)."""
    pick = rng.randrange(22 if depth < 2 else 18)
    if pick == 18:
        return [junk_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if pick == 19:
        return {str(rng.random()): junk_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [
        10**400, -10**400, 2**64, -1, -2, 0, True, False, None, float("nan"), float("inf"), -float("inf"), 1e308,
        0.5, "", "x" * rng.randint(1, 2000), "line\nbreak\x1b[31m\x00\u202e", "\udcff lone surrogate",
        None, None, [[[[[]]]]], {"a": {"b": {"c": None}}},
    ][pick]


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # allow_nan: NaN / Infinity tokens on purpose


def one_line(text: Any, limit: int = MAX_LINE) -> bool:
    return isinstance(text, str) and bool(text) and "\n" not in text and "\r" not in text and len(text) < limit


# ================================================================ a) the replay door (server side)
def replay_case(rng: random.Random) -> tuple[str, list[bytes]]:
    """(kind, frames) of one hostile replay request; kind "huge" is over the request size limit."""
    kind = rng.choice(["bytes", "non-utf8", "json-non-object", "junk-fields", "junk-fields", "deep", "multipart",
                       "empty", "valid", "tokens"])
    if kind == "bytes":
        frames = [rng.randbytes(rng.randint(0, 300))]
    elif kind == "non-utf8":
        frames = [b"\xff\xfe" + rng.randbytes(rng.randint(0, 50)) + b'{"since_seq": 0}']
    elif kind == "json-non-object":
        frames = [as_json(rng.choice([1, "since_seq", [1, 2], None, True, 1.5, [], [{"since_seq": 0}]]))]
    elif kind == "junk-fields":
        request: dict[str, Any] = {}
        for key in rng.sample(["since_seq", "boot_id", "more", "alerts", "x" * 40, ""], rng.randint(0, 4)):
            request[key] = junk_value(rng)
        if rng.random() < 0.5:
            request["since_seq"] = junk_value(rng)
        frames = [as_json(request)]
    elif kind == "tokens":
        frames = [rng.choice([b'{"since_seq": NaN}', b'{"since_seq": Infinity}', b'{"since_seq": -Infinity}',
                              b'{"since_seq": 1e400}', b'{"since_seq": ' + b"9" * 5000 + b"}",
                              b'{"since_seq": 0, "since_seq": "dup"}', b'{"since_seq": 0,}', b"{'since_seq': 0}"])]
    elif kind == "deep":
        depth = rng.randint(2000, 60000)  # under the size limit: must be refused, not end the thread
        frames = [rng.choice([b"[" * depth, b'{"a":' * (depth // 5), b'{"since_seq": ' + b"[" * depth])]
    elif kind == "multipart":
        frames = [rng.choice([b"", as_json({"since_seq": 0}), rng.randbytes(rng.randint(0, 40))])
                  for _ in range(rng.randint(1, 6))]
    elif kind == "empty":
        frames = [b""] * rng.randint(1, 3)
    else:
        frames = [as_json({"since_seq": rng.choice([-1, 0, 1, 2, 5, 10**400]),
                           **({"boot_id": rng.choice([None, ""])} if rng.random() < 0.3 else {})})]
    return kind, frames


def check_reply(frames: list[bytes], where: str) -> dict[str, Any]:
    reply = json.loads(frames[-1].decode("utf-8"), parse_constant=lambda token: pytest.fail(f"{where}: {token}"))
    assert isinstance(reply, dict), where
    assert reply.get("schema") == SCHEMA, where
    if "error" in reply:
        assert one_line(reply["error"]), f"{where}: refusal is not one short line: {reply['error'][:400]!r}"
    else:
        assert isinstance(reply.get("alerts"), list) and isinstance(reply.get("more"), bool), where
    return reply


def test_replay_door_survives_hostile_requests(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    cases = replies = dropped = 0
    kinds: dict[str, int] = {}
    with AlertPublisher(endpoint, run_dir=tmp_path / "run", publisher_id="fuzz", heartbeat_interval=0.2) as pub:
        for event_id in range(3):
            pub.publish("alert", alert_payload(event_id))
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        for topic in (b"status", b"heartbeat", b"alert"):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)
        sockets: dict[int, zmq.Socket] = {}

        def fresh(kind: int) -> zmq.Socket:
            sock = ctx.socket(kind)
            sock.linger = 0
            sock.connect(pub.replay_endpoint)
            return sock

        try:
            deadline = time.monotonic() + 10
            while pub.last_seq["alert"] < 2:
                assert time.monotonic() < deadline, "alerts not sent"
                sub.poll(20)  # a socket wait with a deadline, not a sleep
            expected = [m["seq"] for m in pub.alert_log.read(-1)]
            assert expected == [0, 1, 2]
            for case in range(300):
                kind, frames = replay_case(rng)
                kinds[kind] = kinds.get(kind, 0) + 1
                stype = rng.choice([zmq.REQ, zmq.DEALER])
                if stype not in sockets:
                    sockets[stype] = fresh(stype)
                sock = sockets[stype]
                sock.send_multipart(frames)
                cases += 1
                where = f"case {case} ({kind}, {'REQ' if stype == zmq.REQ else 'DEALER'}) {frames[0][:60]!r}"
                assert sock.poll(REPLY_TIMEOUT_MS), f"{where}: no reply"
                reply = check_reply(sock.recv_multipart(), where)
                replies += 1
                if kind == "valid" and "error" not in reply:
                    since = json.loads(frames[0])["since_seq"]
                    assert [m["seq"] for m in reply["alerts"]] == [s for s in expected if s > since], where
                    assert reply["boot_id"] == pub.boot_id and reply["more"] is False
                elif kind == "valid":
                    pytest.fail(f"{where}: a valid request was refused: {reply['error']}")
            # Over the size limit: libzmq drops the peer (documented); a fresh socket each time.
            for size in (REPLAY_MAX_REQUEST + 1, REPLAY_MAX_REQUEST * 2, 100_000, 1 << 20, 5 << 20, 16 << 20):
                stype = rng.choice([zmq.REQ, zmq.DEALER])
                sock = fresh(stype)
                body = rng.choice([b"[" * size, b"x" * size, as_json({"since_seq": 0, "pad": "y" * size})])
                sock.send(body)
                cases += 1
                if sock.poll(300):
                    check_reply(sock.recv_multipart(), f"huge {size}")
                    replies += 1
                else:
                    dropped += 1
                sock.close(linger=0)
            # Afterwards: it still serves, still beats, still publishes, and reports no fault.
            for sock in sockets.values():
                sock.close(linger=0)
            sockets.clear()
            req = fresh(zmq.REQ)
            req.send(as_json({"since_seq": -1, "boot_id": pub.boot_id}))
            assert req.poll(REPLY_TIMEOUT_MS), "no reply to a normal replay request after the fuzz"
            reply = json.loads(req.recv())
            req.close(linger=0)
            assert reply["alerts"] == pub.alert_log.read(-1) and [m["seq"] for m in reply["alerts"]] == expected
            assert reply["more"] is False
            pub.publish("status", {"state": "running", "source": None, "scorer": None, "open_events": [],
                                   "message": "after the fuzz"})
            seen: set[str] = set()
            beat_after = pub.last_seq["heartbeat"]
            deadline = time.monotonic() + 10
            while {"status", "heartbeat"} - seen:
                assert time.monotonic() < deadline, f"the SUB side went quiet after the fuzz: saw {seen}"
                if sub.poll(200):
                    topic, body = sub.recv_multipart()
                    m = json.loads(body)
                    if topic == b"status" and m.get("message") == "after the fuzz":
                        seen.add("status")
                    elif topic == b"heartbeat" and m["seq"] > beat_after:
                        seen.add("heartbeat")
            assert pub.fault is None and pub.bad_messages == 0
            assert pub.replay_requests >= replies and pub.replay_errors > 0
        finally:
            for sock in sockets.values():
                sock.close(linger=0)
            sub.close(linger=0)
            ctx.term()
    print(f"fuzz door=replay cases={cases} replies={replies} dropped={dropped} kinds={dict(sorted(kinds.items()))}")
    assert cases >= 300 and replies >= 300 and dropped >= 1


# ================================================================ b) the subscriber door (client side)
class HostileReplay(threading.Thread):
    """A ROUTER on the replay port answering every request with seeded junk (or endless ``more``)."""

    MODES = ("empty", "nonjson", "nondict", "error", "junk-alerts", "endless", "endless", "multipart",
             "wrong-schema", "deep", "huge-int", "other-publisher", "valid", "silent", "huge")

    def __init__(self, ctx: zmq.Context, endpoint: str, boots: dict[str, str]) -> None:
        super().__init__(daemon=True, name="hostile-replay")
        self.rng = random.Random(SEED + 1)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.boots = boots  # boot_id -> publisher_id, written by the test before it sends
        self.forced: str | None = None  # the mode for the next requests; None: a seeded random one
        self.stop = threading.Event()
        self.requests: dict[str, int] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if self.router.poll(50):
                    *envelope, body = self.router.recv_multipart()
                    self._answer(envelope, json.loads(body))
        except BaseException:  # noqa: BLE001 — reported by the test
            self.errors.append(traceback.format_exc())
        finally:
            self.router.close(linger=0)

    def _answer(self, envelope: list[bytes], request: dict[str, Any]) -> None:
        mode = self.forced
        if mode is None:
            mode = self.rng.choice([m for m in self.MODES if m not in ("silent", "huge")] * 4 + ["silent", "huge"])
        self.requests[mode] = self.requests.get(mode, 0) + 1
        boot, since = request["boot_id"], request["since_seq"]
        publisher = self.boots.get(boot, "nobody")
        head = {"schema": SCHEMA, "publisher_id": publisher, "boot_id": boot, "replay_boot_id": boot}
        rng = self.rng

        def alert(seq: Any) -> dict[str, Any]:
            return message("alert", publisher, boot, seq, **alert_payload(1))

        frames: list[bytes]
        if mode == "silent":
            return
        if mode == "empty":
            frames = [as_json({**head, "alerts": [], "more": False})]
        elif mode == "nonjson":
            frames = [rng.randbytes(rng.randint(0, 200))]
        elif mode == "nondict":
            frames = [as_json(rng.choice([[1, 2], "alerts", None, 7, [head]]))]
        elif mode == "error":
            frames = [as_json({**head, "error": rng.choice(["nope", "x" * 5000, junk_value(rng)])})]
        elif mode == "junk-alerts":
            items = [junk_value(rng), alert(junk_value(rng)), {**alert(since + 1), "boot_id": junk_value(rng)},
                     {**alert(since + 1), "topic": "status"}, {**alert(since + 1), "schema": "cemd.monitor/9"},
                     {**alert(since + 1), **{k: junk_value(rng) for k in ("duration_ms", "peak_score", "event_id")}},
                     alert(since + 1), alert(since + 1), alert(-5), alert(True)]
            frames = [as_json({**head, "alerts": rng.sample(items, rng.randint(0, len(items))),
                               "more": rng.choice([True, False, 1, "yes", None, junk_value(rng)])})]
        elif mode == "endless":  # always more, with rising seqs: a client that follows it forever hangs
            frames = [as_json({**head, "alerts": [alert(since + k) for k in (1, 2, 3)], "more": True})]
        elif mode == "multipart":
            frames = [as_json({**head, "alerts": [], "more": False}) for _ in range(rng.randint(2, 4))]
        elif mode == "wrong-schema":
            frames = [as_json({**head, "schema": junk_value(rng), "alerts": [alert(since + 1)], "more": False})]
        elif mode == "deep":
            frames = [b"[" * rng.randint(2000, 200_000)]
        elif mode == "huge-int":
            frames = [as_json({**head, "alerts": [alert(10**400), alert(since + 10**400)], "more": True})]
        elif mode == "other-publisher":
            frames = [as_json({**head, "publisher_id": junk_value(rng), "alerts": [alert(since + 1)], "more": True})]
        elif mode == "huge":  # over any sane reply size
            frames = [b'{"schema": "cemd.monitor/1", "alerts": [' + b"1," * (12 << 20) + b"1]}"]
        else:
            frames = [as_json({**head, "alerts": [alert(since + 1)], "more": False})]
        self.router.send_multipart([*envelope, *frames])


class Consumer(threading.Thread):
    """Drives the product's Subscription, JSONL output and live view exactly as `cemd subscribe` does."""

    def __init__(self, client: WatchedClient) -> None:
        super().__init__(daemon=True, name="fuzz-consumer")
        self.client = client
        self.sub = Subscription(client, curve=False)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.jsonl = JsonlOutput(TOPICS, self.out, self.err)
        self.view = LiveView(self.sub)
        self.screen = io.StringIO()
        self.console = Console(file=self.screen, width=160, color_system=None)
        self.waiting: dict[str, threading.Event] = {}  # sentinel publisher id -> processed
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.renders = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                received, notices = self.sub.receive(0.05)
                for item in notices:
                    self.jsonl.notice(item)
                    self.view.note(item)
                if received is not None:
                    self.jsonl.message(received)
                    self.view.add(received)
                    event = self.waiting.get(received["publisher_id"]) if received["topic"] == "status" else None
                    if event is not None and not event.is_set():
                        self.console.print(self.view.render())
                        self.renders += 1
                        event.set()
        except BaseException:  # noqa: BLE001 — nothing may raise out of the client: the test fails on it
            self.errors.append(traceback.format_exc())


def pub_case(rng: random.Random, pool: list[tuple[str, str]], seqs: dict[tuple[str, str], int]) -> list[list[bytes]]:
    """One hostile case on the PUB side: a few multipart messages."""
    publisher, boot = rng.choice(pool)
    key = (publisher, boot)
    kind = rng.randrange(14)
    topic = rng.choice(TOPICS)
    if kind == 0:
        return [[rng.choice(TOPICS).encode() + rng.randbytes(rng.randint(0, 8))] + [
            rng.randbytes(rng.randint(0, 100)) for _ in range(rng.randint(0, 5))]]
    if kind == 1:  # wrong multipart count around a valid body
        body = as_json(message(topic, publisher, boot, seqs[key]))
        return [[topic.encode()] + [body] * rng.choice([0, 2, 3, 5])]
    if kind == 2:
        return [[topic.encode(), rng.choice([b"\xff\xfe\xfd", b"not json", b"", b"[" * 50_000, b'{"a":' * 3000,
                                             b"9" * 5000, b"NaN", b'"\\ud800"'])]]
    if kind == 3:
        return [[topic.encode(), as_json(rng.choice([1, [1], "x", None, True, [message(topic, publisher, boot, 0)]]))]]
    if kind == 4:  # unknown message types / topic mismatches
        other = rng.choice(["alerts", "stat", "", "heartbeat", "map", "x" * 500, junk_value(rng)])
        return [[topic.encode(), as_json(message(other, publisher, boot, seqs[key]))]]
    if kind == 5:  # a common field of the wrong type
        m = message(topic, publisher, boot, seqs[key])
        m[rng.choice(list(m))] = junk_value(rng)
        return [[topic.encode(), as_json(m)]]
    if kind == 6:  # seq backwards, huge, negative
        seq = rng.choice([seqs[key] - 3, 0, -1, 10**400, 2**63, seqs[key] + 5, seqs[key] + 10**18])
        seqs[key] = max(seqs[key], seq + 1) if isinstance(seq, int) and seq < 10**6 else seqs[key]
        return [[topic.encode(), as_json(message(topic, publisher, boot, seq, **alert_payload(3)))]]
    if kind == 7:  # huge: over the SUB's size limit, the peer is dropped (and reconnects)
        return [[b"alert", b'{"pad": "' + b"x" * ((1 << 20) + 100) + b'"}']] if rng.random() < 0.2 else \
            [[b"alert", as_json(message("alert", publisher, boot, seqs[key], pad="x" * 200_000))]]
    # valid envelope, junk fields of every type
    seq = seqs[key]
    seqs[key] = seq + 1
    fields: dict[str, Any] = {}
    if topic == "status":
        fields = {"state": junk_value(rng), "message": junk_value(rng), "open_events": junk_value(rng),
                  "source": {k: junk_value(rng) for k in ("kind", "target", "state", "fps", "frames_read",
                                                          "frames_dropped", "decode_errors")},
                  "scorer": {"modality": junk_value(rng), "modality_mode": junk_value(rng), "fps": junk_value(rng),
                             "backends": rng.choice([{"wli": junk_value(rng)}, junk_value(rng)]),
                             "frames_failed": junk_value(rng)}}
        if rng.random() < 0.3:
            fields = {k: junk_value(rng) for k in fields}
    elif topic == "heartbeat":
        fields = {k: junk_value(rng) for k in ("uptime_s", "interval_s", "state", "last_frame_id")}
        fields["last_seq"] = rng.choice([{"alert": junk_value(rng)}, {"alert": 10**18}, {"alert": seq + 2}, {}])
    elif topic == "alert":
        fields = {**alert_payload(1), **{k: junk_value(rng) for k in rng.sample(
            ["event", "event_id", "modality", "frame_id", "start_frame_id", "end_frame_id", "peak_score",
             "duration_ms", "location", "alert_seq_base", "_replayed"], rng.randint(1, 6))}}
    else:
        fields = {k: junk_value(rng) for k in ("frame_id", "score", "threshold", "timings_ms", "box", "data")}
    fields[rng.choice(["unknown", "x" * 100, "\u202e"])] = junk_value(rng)
    if rng.random() < 0.15:  # nested as deep as the JSON reader still takes, in a field the views show
        depth = rng.choice([100, 500, 900, 990, 2000])
        fields[rng.choice(["state", "message", "event_id", "unknown"])] = "__DEEP__"
        return [[topic.encode(), as_json(message(topic, publisher, boot, seq, **fields)).replace(
            b'"__DEEP__"', b"[" * depth + b"]" * depth)]]
    return [encode(topic, message(topic, publisher, boot, seq, **fields))]


def replay_triggers(rng: random.Random, case: int) -> tuple[str, str, list[list[bytes]]]:
    """A fresh publisher whose messages make the client ask the replay socket (a gap, a heartbeat, a restart)."""
    publisher, boot = f"gap-{case}", uuid.uuid4().hex
    first = encode("alert", message("alert", publisher, boot, 0, **alert_payload(1)))
    how = rng.randrange(3)
    if how == 0:
        jump = rng.choice([3, 300, 10**18, 10**400])
        then = encode("alert", message("alert", publisher, boot, jump, **alert_payload(2)))
    elif how == 1:
        then = encode("heartbeat", message("heartbeat", publisher, boot, 0, uptime_s=1, interval_s=1,
                                           last_seq={"alert": rng.choice([4, 10**18, 10**400])}))
    else:  # a restart: the old boot's later alerts are fetched with no upper bound
        then = encode("status", message("status", publisher, uuid.uuid4().hex, 0, state="running"))
    return publisher, boot, [first, then]


def subscribed(xpub: zmq.Socket, want: set[bytes], deadline: float) -> None:
    got: set[bytes] = set()
    while want - got:
        assert xpub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"never subscribed; got {got}"
        event = xpub.recv()
        if event[:1] == b"\x01":
            got.add(event[1:])


def drain(xpub: zmq.Socket) -> None:
    while xpub.poll(0):
        xpub.recv()


def test_subscriber_door_survives_hostile_publishers_and_replay_servers() -> None:
    rng = random.Random(SEED)
    port = free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.sndhwm = 100_000
    xpub.bind(endpoint)
    boots: dict[str, str] = {}
    replay = HostileReplay(ctx, f"tcp://127.0.0.1:{port + 1}", boots)
    replay.start()
    client = WatchedClient(endpoint, topics=TOPICS, replay_timeout_s=0.2)
    consumer = Consumer(client)
    consumer.start()
    pool = [(f"hostile-{i}", uuid.uuid4().hex) for i in range(3)]
    for publisher, boot in pool:
        boots[boot] = publisher
    seqs = {key: 0 for key in pool}
    cases = sentinels = 0
    finished = False

    def past(case_frames: list[list[bytes]], name: str) -> None:
        """Send one case, then its sentinel until the client has processed it (a deadline, not a sleep)."""
        nonlocal sentinels
        sentinel = f"sentinel-{name}"
        event = consumer.waiting[sentinel] = threading.Event()
        for frames in case_frames:
            xpub.send_multipart(frames)
        status = encode("status", message("status", sentinel, uuid.uuid4().hex, 0, state="running"))
        deadline = time.monotonic() + CASE_DEADLINE_S
        xpub.send_multipart(status)
        while not event.wait(0.2):
            assert not consumer.errors, f"case {name} raised out of the client:\n{consumer.errors[0]}"
            assert time.monotonic() < deadline, f"HANG: the client did not get past case {name} in {CASE_DEADLINE_S} s"
            drain(xpub)
            xpub.send_multipart(status)  # again: a huge frame may have dropped the connection meanwhile
            sentinels += 1
        del consumer.waiting[sentinel]

    try:
        subscribed(xpub, {t.encode() for t in TOPICS}, time.monotonic() + 15)
        past([], "warm-up")
        for case in range(300):
            past(pub_case(rng, pool, seqs), str(case))
            cases += 1
        for case in range(80):  # the replay door of the client: forced modes first, then seeded ones
            publisher, boot, frames = replay_triggers(rng, case)
            boots[boot] = publisher
            replay.forced = HostileReplay.MODES[case] if case < len(HostileReplay.MODES) else None
            past(frames, f"replay-{case}")
            cases += 1
        replay.forced = None
        assert not replay.errors, replay.errors[0]
        finished = True
    finally:
        replay.stop.set()
        consumer.stop.set()
        consumer.join(5)
        replay.join(5)
        if finished or not consumer.is_alive():
            client.close()
        xpub.close(linger=0)
        if finished:
            ctx.term()
    assert not consumer.errors, consumer.errors[0]
    out, err = consumer.out.getvalue().splitlines(), consumer.err.getvalue().splitlines()
    for line in out:  # strict JSON objects only: no NaN tokens reach a JSONL reader
        assert isinstance(json.loads(line, parse_constant=lambda t: pytest.fail(f"{t} in {line[:200]}")), dict)
    notices = [json.loads(line) for line in err]
    assert all(isinstance(n, dict) and one_line(n["message"], 600) for n in notices), \
        [n["message"][:300] for n in notices if not one_line(n["message"], 600)][:3]
    assert client.last_schema_error is None or one_line(client.last_schema_error)
    assert client.schema_errors > 50 and client.replay_failures > 0 and client.gaps > 0
    assert replay.requests.get("endless", 0) >= 2
    assert client.revived >= 1, "no oversized frame dropped the connection: the revive path went untested"
    assert "Traceback" not in consumer.screen.getvalue() and "display error" not in consumer.screen.getvalue()
    print(f"fuzz door=subscriber cases={cases} sentinels_resent={sentinels} renders={consumer.renders} "
          f"replay_requests={sum(replay.requests.values())} schema_errors={client.schema_errors} "
          f"gaps={client.gaps} replay_failures={client.replay_failures} revived={client.revived} notices={len(notices)}")
    assert cases >= 380 and consumer.renders >= cases


def test_client_follows_more_for_a_bounded_number_of_rounds() -> None:
    """An endless ``more: true`` is followed at most MAX_REPLAY_ROUNDS times, then counted as a replay failure."""
    port = free_port_pair()
    ctx = zmq.Context()
    boots: dict[str, str] = {}
    replay = HostileReplay(ctx, f"tcp://127.0.0.1:{port + 1}", boots)
    replay.forced = "endless"
    replay.start()
    try:
        with MonitorClient(f"tcp://127.0.0.1:{port}", replay_timeout_s=2.0) as client:
            boots["b" * 32] = "p"
            alerts = client._fetch("p", "b" * 32, since=0, upto=None)
            assert client.replay_failures == 1
        assert replay.requests["endless"] == MAX_REPLAY_ROUNDS
        assert [m["seq"] for m in alerts] == list(range(1, 3 * MAX_REPLAY_ROUNDS + 1))
    finally:
        replay.stop.set()
        replay.join(5)
        ctx.term()


# ================================================================ c) `cemd subscribe --jsonl` as a real process
def test_cli_subscriber_survives_a_hostile_publisher_and_exits_on_stop() -> None:
    rng = random.Random(SEED + 2)
    endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(endpoint)
    pool = [(f"hostile-{i}", uuid.uuid4().hex) for i in range(2)]
    seqs = {key: 0 for key in pool}
    proc = subprocess.Popen([sys.executable, "-m", "realtime.cli", "subscribe", endpoint, "--jsonl", "--topics", "all",
                             "--exit-on-stop", "--max-seconds", "60"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=stream, k=key: lines[k].extend(s), daemon=True)  # drained as it
               for stream, key in ((proc.stdout, "out"), (proc.stderr, "err"))]       # writes: a full pipe blocks it
    for reader in readers:
        reader.start()
    cases = 0
    try:
        subscribed(xpub, {t.encode() for t in TOPICS}, time.monotonic() + 20)
        for _ in range(60):
            for frames in pub_case(rng, pool, seqs):
                xpub.send_multipart(frames)
            cases += 1
        stop = encode("status", message("status", "final", uuid.uuid4().hex, 0, state="stopped", message=None,
                                        source=None, scorer=None, open_events=[]))
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"cemd subscribe did not exit on the stop status: {lines['err'][-5:]}"
            drain(xpub)
            xpub.send_multipart(stop)  # again until it exits: a huge frame may have dropped the connection
            try:
                proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        for reader in readers:
            reader.join(10)
    finally:
        proc.kill()
        proc.wait(10)
        xpub.close(linger=0)
        ctx.term()
    out, err = "".join(lines["out"]), "".join(lines["err"])
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err
    for line in out.splitlines():
        assert isinstance(json.loads(line, parse_constant=lambda t: pytest.fail(t)), dict), line[:200]
    notices = [json.loads(line) for line in err.splitlines()]
    assert all(one_line(n["message"], 600) for n in notices)
    assert notices[-1]["reason"] == "monitor_stopped" and notices[-1]["counters"]["schema_errors"] > 0
    print(f"fuzz door=subscriber-cli cases={cases} stdout_lines={len(out.splitlines())} notices={len(notices)}")
    assert cases >= 60
