"""Alert publisher, wire schema, durable log, replay, CURVE and the subscriber client, on real sockets."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zmq

from engine.errors import CemdError
from realtime.clients.client import CurveClientConfig, MonitorClient
from realtime.clients.overlay import decode_heatmap, encode_heatmap
from realtime.publish import keys as keys_cli
from realtime.publish.alert_log import AlertLog
from realtime.publish.keys import generate_keypair
from realtime.publish.publisher import AlertPublisher, CurveServerConfig
from realtime.publish.schema import SCHEMA, TOPIC_FIELDS, SchemaError, decode, encode
from tests.helpers.jsonschema_check import JSON_SCHEMA, Invalid, check
from tests.helpers.streams import free_port_pair

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers
@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port_pair()}"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def location() -> dict[str, Any]:
    return {"box": [10, 20, 30, 40], "contour": [[10, 20], [40, 20], [40, 60], [10, 60]], "peak": [25, 40]}


def score_payload(frame_id: int, score: float = 0.42) -> dict[str, Any]:
    return {
        "frame_id": frame_id, "pts": frame_id * 3000, "time_base": [1, 90000],
        "t_capture_wall_ns": time.time_ns(), "t_capture_mono_ns": time.monotonic_ns(),
        "timings_ms": {"capture": 1.0, "preprocess": 2.0, "inference": np.float32(11.5), "decision": 0.1},
        "modality": "wli", "modality_mode": "auto", "backend": "cpu-eager",
        "score": score, "threshold": 0.5, "event_state": "idle", "event_id": None, "location": None,
        "t_decision_mono_ns": time.monotonic_ns(),
    }


def alert_payload(event_id: int, event: str = "start", frame_id: int = 7) -> dict[str, Any]:
    return {
        "event": event, "event_id": event_id, "modality": "nbi", "frame_id": frame_id, "pts": None,
        "start_frame_id": frame_id, "end_frame_id": frame_id if event == "end" else None,
        "score": 0.91, "peak_score": 0.93, "peak_frame_id": frame_id, "threshold": 0.5, "duration_ms": 0.0,
        "location": location(),
    }


def status_payload(state: str = "running", message: str | None = None) -> dict[str, Any]:
    return {
        "state": state,
        "source": {"kind": "file", "target": "clip.mp4", "state": "running", "frames_read": 10, "frames_dropped": 0,
                   "decode_errors": 0, "fps": 30.0, "width": 640, "height": 480, "last_frame_age_ms": 3.2},
        "scorer": {"state": "running", "modality": "wli", "modality_mode": "auto",
                   "backends": {"wli": "cpu-eager", "nbi": "cpu-eager"}, "fps": 29.5},
        "open_events": [alert_payload(3)],
        "message": message,
    }


def recv_until(client: MonitorClient, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 5.0) -> list[dict]:
    """Messages received until ``done(messages so far)`` is true."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = client.recv(timeout_s=0.1)
        if message is not None:
            seen.append(message)
            if done(seen):
                return seen
    raise AssertionError(f"condition not met in {timeout_s} s; got topics {[m['topic'] for m in seen]}")


def got(topic: str, **fields: Any) -> Callable[[list[dict[str, Any]]], bool]:
    """done() for recv_until: the last message is of ``topic`` and has ``fields``."""
    return lambda seen: seen[-1]["topic"] == topic and all(seen[-1].get(k) == v for k, v in fields.items())


def wait_sent(pub: AlertPublisher, topic: str, seq: int, timeout_s: float = 10.0) -> None:
    """Until the publisher thread has sent ``topic`` message ``seq`` (publish() only queues)."""
    deadline = time.monotonic() + timeout_s
    while pub.last_seq[topic] < seq:
        assert time.monotonic() < deadline, f"{topic} {seq} not sent in {timeout_s} s"
        time.sleep(0.01)


def connected(pub: AlertPublisher, client: MonitorClient) -> None:
    """Past the slow-joiner window: the client has received something from this publisher boot."""
    recv_until(client, lambda seen: seen[-1]["boot_id"] == pub.boot_id)


# ---------------------------------------------------------------- schema
def test_published_messages_round_trip_and_match_the_json_schema(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, publisher_id="room-1", heartbeat_interval=0.2) as pub, \
            MonitorClient(endpoint) as client:
        connected(pub, client)
        pub.publish("status", status_payload())
        pub.publish("score", score_payload(0, score=float("nan")))
        pub.publish("alert", alert_payload(1))
        pub.publish("map", {"frame_id": 0, "modality": "wli", "box": [-10, 0, 260], "location": location(),
                            **encode_heatmap(np.full((256, 256), 0.3, np.float32), 8, 0.6)})
        first: dict[str, dict[str, Any]] = {}
        for message in recv_until(client, lambda seen: {m["topic"] for m in seen} == set(TOPIC_FIELDS)
                                  and any(m["topic"] == "alert" for m in seen)):
            first.setdefault(message["topic"], message)
        for topic, message in first.items():
            check(message, JSON_SCHEMA)
            assert message["schema"] == SCHEMA and message["publisher_id"] == "room-1"
            assert set(TOPIC_FIELDS[topic]) <= set(message), topic
            assert decode(encode(topic, message)) == message
        score = first["score"]
        assert score["score"] is None  # NaN travels as null
        assert "t_decision_mono_ns" not in score
        assert score["timings_ms"]["inference"] == 11.5 and score["timings_ms"]["publish"] >= 0
        assert len(pub.publish_delays_ms()) == 1
        assert first["alert"]["seq"] == 0 and first["alert"]["boot_id"] == pub.boot_id
        assert first["heartbeat"]["last_seq"].keys() >= {"alert", "score", "status", "map"}
        grid = decode_heatmap(first["map"])
        assert grid is not None and grid.shape == (8, 8) and abs(float(grid.mean()) - 0.5) < 0.01  # 0.3 of vmax 0.6
        # The validator is not vacuous: a broken alert fails it.
        broken = dict(first["alert"], event="maybe")
        with pytest.raises(Invalid):
            check(broken, JSON_SCHEMA)


@pytest.mark.parametrize("frames, reason", [
    ([b"alert"], "2 frames"),
    ([b"alert", b"{}", b"x"], "2 frames"),
    ([b"video", b"{}"], "unknown topic"),
    ([b"\xff\xfe", b"{}"], "ASCII"),
    ([b"alert", b"\xff\x00garbage"], "UTF-8 JSON"),
    ([b"alert", b"{not json"], "UTF-8 JSON"),
    ([b"alert", b"[1, 2]"], "JSON object"),
    ([b"alert", b'{"schema": "cemd.monitor/1"}'], "common field"),
    ([b"alert", b'{"schema": "other/1"}'], "not a cemd.monitor"),
])
def test_decode_rejects_garbage(frames: list[bytes], reason: str) -> None:
    with pytest.raises(SchemaError, match=reason):
        decode(frames)


def _message(topic: str = "alert", **changes: Any) -> dict[str, Any]:
    message = {"schema": SCHEMA, "topic": topic, "publisher_id": "p", "boot_id": "0" * 32, "seq": 0,
               "t_wall_ns": 1, "t_mono_ns": 2, **alert_payload(1)}
    message.update(changes)
    return message


def test_decode_rejects_another_major_and_ignores_unknown_fields() -> None:
    with pytest.raises(SchemaError, match="major version 2.*upgrade the client"):
        decode(encode("alert", _message(schema="cemd.monitor/2")))
    minor = decode(encode("alert", _message(schema="cemd.monitor/1.3", future_field={"x": 1})))
    assert minor["future_field"] == {"x": 1}
    with pytest.raises(SchemaError, match="differs"):
        decode([b"score", json.dumps(_message("alert")).encode()])


def test_client_counts_and_skips_garbage(endpoint: str) -> None:
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(endpoint)
    try:
        with MonitorClient(endpoint) as client:
            assert xpub.poll(5000), "client never subscribed"
            while xpub.poll(200):
                xpub.recv()
            for frames in ([b"alert", b"\x00\x01garbage"], [b"alert"], [b"status", b"{}"],
                           encode("alert", _message(schema="cemd.monitor/2")), encode("alert", _message(seq=0))):
                xpub.send_multipart(frames)
            message = client.recv(timeout_s=5)
            assert message is not None and message["seq"] == 0 and message["topic"] == "alert"
            assert client.schema_errors == 4
    finally:
        xpub.close()
        ctx.term()


# ---------------------------------------------------------------- durable alert log
def test_alert_log_fsyncs_reads_since_seq_and_skips_a_torn_line(tmp_path: Path, monkeypatch) -> None:
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    path = tmp_path / "alerts.jsonl"
    log = AlertLog(path)
    for seq in range(3):
        log.append(_message(seq=seq, boot_id="a" * 32))
    for seq in range(2):
        log.append(_message(seq=seq, boot_id="b" * 32))
    log.close()
    assert len(fsyncs) >= 5
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])

    assert [m["seq"] for m in log.read(0, "a" * 32)] == [1, 2]
    assert [m["seq"] for m in log.read(-1, "b" * 32)] == [0, 1]
    assert len(log.read(0)) == 3  # every boot

    with open(path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"schema": "cemd.monitor/1", "seq": 9, "boo')
    assert len(log.read(-1)) == 5 and log.torn_lines == 1
    resumed = AlertLog(path)  # the next run ends the fragment, then appends a whole line
    resumed.append(_message(seq=2, boot_id="b" * 32))
    resumed.close()
    assert [m["seq"] for m in resumed.read(1, "b" * 32)] == [2]
    assert resumed.corrupt_lines == 1 and resumed.torn_lines == 0


def _check_degraded_but_alerting(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2) as pub, MonitorClient(endpoint) as client:
        connected(pub, client)
        pub.publish("status", status_payload("running"))
        pub.publish("alert", alert_payload(1))
        seen = recv_until(client, lambda seen: any(m["topic"] == "alert" for m in seen)
                          and seen[-1]["topic"] == "status" and seen[-1]["seq"] >= 1)
        alert = next(m for m in seen if m["topic"] == "alert")
        assert alert["event_id"] == 1
        status = [m for m in seen if m["topic"] == "status"][-1]
        assert status["state"] == "degraded" and "alert log" in status["message"] and "NOT recorded" in status["message"]
        check(status, JSON_SCHEMA)
        assert pub.log_errors >= 1 and pub.fault is None
        heartbeat = recv_until(client, got("heartbeat"))[-1]
        assert heartbeat["state"] == "degraded"


@pytest.mark.parametrize("fault", ["full disk", "log is a folder"])
def test_log_failure_still_publishes_the_alert_and_a_degraded_status(endpoint: str, run_dir: Path, fault: str) -> None:
    """Two failures that hold even for root: ENOSPC on every write, and EISDIR already at open."""
    run_dir.mkdir()
    if fault == "full disk":
        if not Path("/dev/full").exists():
            pytest.skip("needs /dev/full to simulate a full disk")
        (run_dir / "alerts.jsonl").symlink_to("/dev/full")
    else:
        (run_dir / "alerts.jsonl").mkdir()
    _check_degraded_but_alerting(endpoint, run_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_run_dir_still_publishes_the_alert_and_a_degraded_status(endpoint: str, run_dir: Path) -> None:
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        _check_degraded_but_alerting(endpoint, run_dir)
    finally:
        run_dir.chmod(0o700)


# ---------------------------------------------------------------- liveness and late joiners
def test_heartbeat_keeps_beating_while_the_caller_is_blocked(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=1.0,
                        state_provider=lambda: {"state": "running", "last_frame_id": 41}) as pub, \
            MonitorClient(endpoint) as client:
        connected(pub, client)
        t0 = time.monotonic_ns()
        time.sleep(2.3)  # the caller's thread stuck in inference
        t1 = time.monotonic_ns()
        beats = []
        while (message := client.recv(timeout_s=0.2)) is not None:
            if message["topic"] == "heartbeat" and t0 <= message["t_mono_ns"] <= t1:
                beats.append(message)
        assert len(beats) in (2, 3)
        gaps_s = [(b["t_mono_ns"] - a["t_mono_ns"]) / 1e9 for a, b in zip(beats, beats[1:])]
        assert all(0.8 < gap < 1.2 for gap in gaps_s), gaps_s
        assert beats[0]["state"] == "running" and beats[0]["last_frame_id"] == 41
        assert client.silent_for_s() < 1.0


def test_a_final_heartbeat_names_the_last_alert(endpoint: str, run_dir: Path) -> None:
    pub = AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=30.0).start()  # no periodic beat meanwhile
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
        sub.connect(endpoint)
        sub.poll(2000)
        while sub.poll(300):  # the start-up beat (and nothing else)
            sub.recv_multipart()
        pub.publish("alert", alert_payload(0))
        pub.publish("alert", alert_payload(1))
        pub.publish("status", status_payload("stopped"))
        pub.close()
        assert sub.poll(5000), "no heartbeat after close"
        beat = decode(sub.recv_multipart())
        assert beat["topic"] == "heartbeat" and beat["last_seq"]["alert"] == 1 and beat["last_seq"]["status"] >= 0
    finally:
        sub.close(0)
        ctx.term()


def test_late_joiner_gets_the_last_status_at_once(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=30.0) as pub:
        pub.publish("status", status_payload("running", "all good"))
        wait_sent(pub, "status", 0)
        with MonitorClient(endpoint, topics=("status",)) as first:
            t0 = time.monotonic()
            status = first.recv(timeout_s=2.0)
            waited = time.monotonic() - t0
            assert status is not None and status["message"] == "all good" and status["seq"] == 0
            assert waited < 1.0, f"late joiner waited {waited:.3f} s"
            with MonitorClient(endpoint) as second:  # its subscription re-sends the status to both
                again = second.recv(timeout_s=2.0)
                assert again is not None and again["topic"] == "status" and again["seq"] == 0
            assert first.recv(timeout_s=0.3) is None and first.duplicates == 1


# ---------------------------------------------------------------- loss, replay, restarts
def test_slow_subscriber_gets_every_alert_once_and_in_order(endpoint: str, run_dir: Path) -> None:
    total = 1000
    # Small queues at both ends, and small kernel buffers: otherwise TCP autotuning absorbs the burst.
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2, sndhwm=10, sndbuf=16384) as pub, \
            MonitorClient(endpoint, rcvhwm=10, rcvbuf=16384, topics=("alert", "heartbeat")) as client:
        connected(pub, client)
        for event_id in range(total):
            assert pub.publish("alert", alert_payload(event_id))
        wait_sent(pub, "alert", total - 1)
        alerts = [m for m in recv_until(client, got("alert", seq=total - 1), 15)
                  if m["topic"] == "alert"]
        assert [m["seq"] for m in alerts] == list(range(total))
        assert [m["event_id"] for m in alerts] == list(range(total))
        assert client.gaps >= 1 and client.replayed > 0, "the burst was not lossy; the test proves nothing"
        assert client.unrecovered == 0 and client.replay_failures == 0
        assert sum(1 for m in alerts if m.get("_replayed")) == client.replayed


def test_client_replays_a_lost_last_alert_named_by_a_heartbeat_and_survives_a_replay_timeout(endpoint: str) -> None:
    """A hand-driven monitor: its replay ROUTER ignores the first request, then answers."""
    boot = "f" * 32
    logged = {seq: _message(seq=seq, boot_id=boot, publisher_id="fake", event_id=seq) for seq in range(4)}
    requests: list[dict[str, Any]] = []
    stop = threading.Event()
    replay_bound = threading.Event()

    def replay_server(ctx: zmq.Context) -> None:
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(endpoint.rsplit(":", 1)[0] + f":{int(endpoint.rsplit(':', 1)[1]) + 1}")
        replay_bound.set()
        while not stop.is_set():
            if router.poll(50):
                *envelope, body = router.recv_multipart()
                requests.append(json.loads(body))
                if len(requests) > 1:
                    since = requests[-1]["since_seq"]
                    alerts = [m for s, m in logged.items() if s > since]
                    router.send_multipart([*envelope, json.dumps(
                        {"schema": SCHEMA, "publisher_id": "fake", "boot_id": boot, "alerts": alerts, "more": False}
                    ).encode()])
        router.close()

    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(endpoint)
    server = threading.Thread(target=replay_server, args=(ctx,))
    server.start()
    try:
        replay_bound.wait(5)
        with MonitorClient(endpoint, replay_timeout_s=0.3) as client:
            assert xpub.poll(5000)
            xpub.send_multipart(encode("alert", logged[0]))
            assert client.recv(timeout_s=2)["seq"] == 0
            heartbeat = _message("heartbeat", publisher_id="fake", boot_id=boot, seq=0,
                                 last_seq={"alert": 1, "score": -1, "status": -1})
            xpub.send_multipart(encode("heartbeat", heartbeat))  # alert 1 never came: lost
            assert client.recv(timeout_s=2)["topic"] == "heartbeat"  # replay timed out: nothing to insert
            assert client.gaps == 1 and client.replay_failures == 1 and client.unrecovered == 1
            xpub.send_multipart(encode("alert", logged[3]))  # alert 2 lost too; a fresh REQ asks again
            got_back = [client.recv(timeout_s=2) for _ in range(2)]
            assert [(m["seq"], m.get("_replayed", False)) for m in got_back] == [(2, True), (3, False)]
            assert client.gaps == 2 and client.replayed == 1 and client.unrecovered == 1
            assert [r["since_seq"] for r in requests] == [0, 1] and requests[0]["boot_id"] == boot
    finally:
        stop.set()
        server.join()
        xpub.close()
        ctx.term()


def test_history_client_gets_the_alerts_sent_before_it_joined(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2) as pub:
        for event_id in range(3):
            pub.publish("alert", alert_payload(event_id))
        wait_sent(pub, "alert", 2)
        with MonitorClient(endpoint, topics=("alert", "heartbeat"), history=True) as client:
            seen = recv_until(client, got("heartbeat"))
            assert [(m["seq"], m["_replayed"]) for m in seen if m["topic"] == "alert"] == [(0, True), (1, True), (2, True)]
        with MonitorClient(endpoint, topics=("alert", "heartbeat")) as client:  # default: from now on
            recv_until(client, got("heartbeat"))
            assert client.gaps == 0 and client.replayed == 0
    with pytest.raises(CemdError, match="unknown topic.*alerts"):
        MonitorClient(endpoint, topics=("alerts",))


def test_publisher_restart_is_a_boot_change_not_a_gap(endpoint: str, run_dir: Path) -> None:
    with MonitorClient(endpoint, topics=("alert", "status", "heartbeat")) as client:
        first = AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2).start()
        try:
            connected(first, client)
            for event_id in range(3):
                first.publish("alert", alert_payload(event_id))
            recv_until(client, got("alert", seq=2))
        finally:
            first.close()
        with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2) as second:
            assert second.boot_id != first.boot_id
            connected(second, client)
            for event_id in range(2):
                second.publish("alert", alert_payload(10 + event_id))
            alerts = [m for m in recv_until(client, got("alert", seq=4))
                      if m["topic"] == "alert"]
            # the same run folder: alert seqs and event ids continue from its log (--supervise)
            assert [(m["boot_id"], m["seq"]) for m in alerts] == [(second.boot_id, 3), (second.boot_id, 4)]
            assert second.alert_seq_base == 3 and second.event_id_base == 3
            assert all(m["alert_seq_base"] == 3 for m in alerts)
        assert client.boot_changes == 1 and client.gaps == 0 and client.replayed == 0
    log = AlertLog(run_dir / "alerts.jsonl")
    assert [m["seq"] for m in log.read(-1)] == [0, 1, 2, 3, 4]  # both boots in one log, no seq twice
    assert log.resume()[:2] == (4, 11)


def test_events_a_dead_monitor_left_open_are_found_and_ended(tmp_path: Path) -> None:
    from realtime.scoring.alerts import AlertLogic
    from tests.helpers.jsonschema_check import JSON_SCHEMA, check

    log = AlertLog(tmp_path / "alerts.jsonl")
    boot = "0" * 32
    lines = [("start", 0), ("end", 0), ("start", 1), ("update", 1), ("start", 2)]  # 1 and 2 never ended
    for seq, (event, event_id) in enumerate(lines):
        message = {"schema": "cemd.monitor/1", "topic": "alert", "publisher_id": "p", "boot_id": boot, "seq": seq,
                   "t_wall_ns": 1, "t_mono_ns": 1, **alert_payload(event_id, event, frame_id=10 + seq)}
        log.append(message)
    open_ = log.resume()[2]
    assert [(m["event_id"], m["event"], m["frame_id"]) for m in open_] == [(1, "update", 13), (2, "start", 14)]
    end = AlertLogic.end_orphan(open_[0])
    assert end["event"] == "end" and end["reason"] == "monitor_restarted" and end["end_frame_id"] == 13
    stamped = {"schema": "cemd.monitor/1", "topic": "alert", "publisher_id": "p", "boot_id": "1" * 32, "seq": 5,
               "t_wall_ns": 1, "t_mono_ns": 1, **end}
    check(stamped, JSON_SCHEMA, where="orphan end")


def test_replay_answers_garbage_with_an_error_and_keeps_serving(endpoint: str, run_dir: Path) -> None:
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2) as pub:
        for event_id in range(3):
            pub.publish("alert", alert_payload(event_id))
        wait_sent(pub, "alert", 2)
        ctx = zmq.Context()
        try:
            replay = pub.replay_endpoint

            def ask(*frames: bytes) -> dict[str, Any]:
                req = ctx.socket(zmq.REQ)
                req.linger = 0
                req.connect(replay)
                req.send_multipart(list(frames))
                assert req.poll(3000), "no reply"
                reply = json.loads(req.recv())
                req.close()
                return reply

            for frames in ([b"\xff\x00 not json"], [b"[1, 2]"], [b'{"since_seq": "x"}'], [b'{"boot_id": 5}'],
                           [b"{}", b"extra"], [b'{"since_seq": -1, "boot_id": 3}']):
                reply = ask(*frames)
                assert reply["schema"] == SCHEMA and reply["error"], frames
            dealer = ctx.socket(zmq.DEALER)  # no REQ envelope at all, and an oversized message
            dealer.linger = 0
            dealer.connect(replay)
            dealer.send(b"x" * 100_000)
            dealer.send(b"garbage")
            time.sleep(0.2)
            dealer.close()
            reply = ask(json.dumps({"since_seq": 0}).encode())
            assert [m["seq"] for m in reply["alerts"]] == [1, 2] and reply["boot_id"] == pub.boot_id
            assert reply["more"] is False and pub.fault is None
            for alert in reply["alerts"]:
                check(alert, JSON_SCHEMA)
        finally:
            ctx.term()


def test_port_in_use_is_a_clear_error(endpoint: str, run_dir: Path) -> None:
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(CemdError, match=rf"port {port} on 127.0.0.1 is in use.*--publish tcp://127.0.0.1:PORT"):
            AlertPublisher(endpoint, run_dir=run_dir).start()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))
        squatter.listen()
        with pytest.raises(CemdError, match=rf"port {port + 1} .* in use.*--replay"):
            AlertPublisher(endpoint, run_dir=run_dir).start()
    with AlertPublisher(endpoint, run_dir=run_dir):  # nothing was left bound by the failures
        pass


# ---------------------------------------------------------------- CURVE
@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    allow = tmp_path / "allowed"
    server_pub, server_secret = generate_keypair(tmp_path / "server", "monitor")
    client_pub, client_secret = generate_keypair(tmp_path / "client", "station")
    _, rogue_secret = generate_keypair(tmp_path / "rogue", "rogue")
    allow.mkdir()
    (allow / "station.key").write_bytes(client_pub.read_bytes())
    return {"server_pub": server_pub, "server_secret": server_secret, "client_secret": client_secret,
            "rogue_secret": rogue_secret, "allow": allow}


def test_curve_admits_allowed_clients_and_logs_rejected_ones(endpoint: str, run_dir: Path,
                                                               curve_keys: dict[str, Path]) -> None:
    curve = CurveServerConfig(curve_keys["server_secret"], curve_keys["allow"])
    with AlertPublisher(endpoint, run_dir=run_dir, heartbeat_interval=0.2, curve=curve) as pub:
        allowed = MonitorClient(endpoint, curve=CurveClientConfig(curve_keys["client_secret"], curve_keys["server_pub"]))
        rogue = MonitorClient(endpoint, curve=CurveClientConfig(curve_keys["rogue_secret"], curve_keys["server_pub"]))
        plain = MonitorClient(endpoint)
        try:
            connected(pub, allowed)
            pub.publish("alert", alert_payload(1))
            assert recv_until(allowed, got("alert"))[-1]["event_id"] == 1
            assert rogue.recv(timeout_s=0.6) is None and plain.recv(timeout_s=0.1) is None
            # An allowed client also gets replays over CURVE.
            pub.publish("alert", alert_payload(2))
            pub.publish("alert", alert_payload(3))
            wait_sent(pub, "alert", 2)
            assert [m["seq"] for m in allowed._fetch(pub.publisher_id, pub.boot_id, since=0, upto=2)] == [1, 2]
            deadline = time.monotonic() + 3
            while pub.rejected_handshakes < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for client in (allowed, rogue, plain):
                client.close()
        security_log = (run_dir / "security.log").read_text()
        # The rogue key fails AUTH; the plain client fails PROTOCOL or hangs up mid-handshake (NO_DETAIL).
        assert pub.rejected_handshakes >= 2, security_log
        rogue_public = curve_keys["rogue_secret"].read_text().split('public-key = "')[1].split('"')[0]
        assert "HANDSHAKE_FAILED_AUTH" in security_log and rogue_public in security_log
        assert "HANDSHAKE_FAILED_PROTOCOL" in security_log or "HANDSHAKE_FAILED_NO_DETAIL" in security_log


def test_curve_key_errors_name_the_file_and_cemd_keys(endpoint: str, run_dir: Path, tmp_path: Path,
                                                      curve_keys: dict[str, Path]) -> None:
    missing = tmp_path / "nope.key_secret"
    with pytest.raises(CemdError, match=r"nope\.key_secret.*cemd keys"):
        AlertPublisher(endpoint, run_dir=run_dir, curve=CurveServerConfig(missing, curve_keys["allow"])).start()
    with pytest.raises(CemdError, match=r"only a public key"):
        AlertPublisher(endpoint, run_dir=run_dir,
                       curve=CurveServerConfig(curve_keys["server_pub"], curve_keys["allow"])).start()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CemdError, match=r"no \*\.key files.*cemd keys"):
        AlertPublisher(endpoint, run_dir=run_dir, curve=CurveServerConfig(curve_keys["server_secret"], empty)).start()
    with pytest.raises(CemdError, match=r"nope\.key.*cemd keys"):
        MonitorClient(endpoint, curve=CurveClientConfig(curve_keys["client_secret"], tmp_path / "nope.key"))


def test_cemd_keys_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="cemd")
    keys_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "--out", str(tmp_path / "k"), "--name", "monitor"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "--curve-secret" in out and "--curve-allow" in out
    secret = tmp_path / "k" / "monitor.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert secret_key and zmq.auth.load_certificate(tmp_path / "k" / "monitor.key") == (public_key, None)
    before = secret.read_bytes()
    with pytest.raises(CemdError, match="refusing to overwrite"):
        args.func(args)
    assert secret.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["monitor.key", "monitor.key_secret"]
    with pytest.raises(CemdError, match="plain file name"):
        generate_keypair(tmp_path, "../evil")


def test_numpy_and_non_finite_values_become_plain_json() -> None:
    frames = encode("score", _message("score", score=np.float32(math.inf), box=np.arange(4)))
    message = decode(frames)
    assert message["score"] is None and message["box"] == [0, 1, 2, 3]
    assert b"Infinity" not in frames[1] and b" " not in frames[1]
