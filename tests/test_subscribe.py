"""`cemd subscribe` as a real subprocess: against the real monitor, a real AlertPublisher, raw sockets, CURVE."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import zmq

from realtime.publish.keys import generate_keypair
from realtime.publish.publisher import AlertPublisher, CurveServerConfig
from realtime.publish.schema import SCHEMA, TOPICS, encode
from tests.helpers.streams import free_port_pair, wait_for_line

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200")  # wide: rich must not wrap the lines we look for
# A 6 s synthetic examination with one lesion the demo bundle catches (elevated erythema, WLI, frames 34–59).
SEED, SECONDS, FPS, SIZE = 3, 6, 10, (320, 240)


_AS_FROM_A_SHELL = ("import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, []); "
                    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'cemd'; "
                    "runpy.run_module('realtime.cli.main', run_name='__main__')")


class Cli:
    """``cemd subscribe ARGS`` in a subprocess; its stdout and stderr lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        # Started the way a shell starts it: SIGINT unblocked and at its default. A child inherits blocked and
        # ignored signals, and the test process may carry them from earlier tests' process machinery; a Ctrl-C
        # test must not depend on that.
        self.proc = subprocess.Popen([sys.executable, "-c", _AS_FROM_A_SHELL, "subscribe", *args], cwd=REPO, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def __enter__(self) -> Cli:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def wait_for(self, lines: list[str], done: Callable[[str], bool], timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            new = lines[seen:]  # one snapshot: a line appended meanwhile is read in the next round
            seen += len(new)
            for line in new:
                if done(line):
                    return line
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.02)
        raise AssertionError(f"not seen in {timeout_s} s; stdout {self.out[-20:]}, stderr {self.err[-20:]}")

    def wait_message(self, done: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0) -> dict[str, Any]:
        return json.loads(self.wait_for(self.out, lambda line: done(json.loads(line)), timeout_s))

    def wait_notice(self, kind: str, timeout_s: float = 15.0) -> dict[str, Any]:
        return json.loads(self.wait_for(self.err, lambda line: f'"_client":"{kind}"' in line, timeout_s))

    def finish(self, timeout_s: float = 20.0) -> int:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                sig = [line for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
                       if line.startswith(("State", "Sig", "Shd"))]
            except OSError:
                sig = []
            raise AssertionError(f"cemd subscribe did not exit in {timeout_s} s; {sig}; stderr {self.err[-10:]}") from None
        for reader in self._readers:
            reader.join(5)
        return rc

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out]

    def notices(self, kind: str | None = None) -> list[dict[str, Any]]:
        found = [json.loads(line) for line in self.err]
        return [n for n in found if kind is None or n["_client"] == kind]


@pytest.fixture
def endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port_pair()}"


def alert_payload(event_id: int, event: str = "start", frame_id: int = 7) -> dict[str, Any]:
    return {"event": event, "event_id": event_id, "modality": "nbi", "frame_id": frame_id, "pts": None,
            "start_frame_id": frame_id, "end_frame_id": frame_id if event == "end" else None, "score": 0.91,
            "peak_score": 0.93, "peak_frame_id": frame_id, "threshold": 0.5, "duration_ms": 0.0,
            "location": {"box": [10, 20, 30, 40], "contour": [[10, 20], [40, 20], [40, 60]], "peak": [25, 40]}}


def status_payload(state: str = "running") -> dict[str, Any]:
    return {"state": state, "message": None, "open_events": [],
            "source": {"kind": "file", "target": "clip.mp4", "state": "running", "frames_read": 10,
                       "frames_dropped": 0, "decode_errors": 0, "fps": 30.0},
            "scorer": {"state": "ready", "modality": "wli", "modality_mode": "auto",
                       "backends": {"wli": "eager", "nbi": "eager"}, "fps": 29.5}}


def wait_sent(pub: AlertPublisher, topic: str, seq: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pub.last_seq[topic] < seq:
        assert time.monotonic() < deadline, f"{topic} {seq} not sent in {timeout_s} s"
        time.sleep(0.01)


def alerts_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["topic"] == "alert"]


# ---------------------------------------------------------------- a real monitor run
@pytest.mark.slow
def test_cli_prints_every_alert_of_a_real_monitor_run_in_order(tmp_path: Path) -> None:
    from engine.synth.video import render_video

    video = tmp_path / "exam.mp4"
    render_video(video, SEED, SECONDS, FPS, SIZE, progress=False)
    endpoint, run_dir = f"tcp://127.0.0.1:{free_port_pair()}", tmp_path / "run"
    monitor = subprocess.Popen([sys.executable, str(REPO / "run_stream.py"), "--dashboard", "off", "--source",
                                str(video), "--fast", "--inference-workers", "1", "--bundle", "models/demo",
                                "--backend", "eager", "--publish", endpoint,
                                "--run-dir", str(run_dir), "--sensitivity", "1.5"],  # the client is tested, not the model:
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # more alerts
                               text=True)
    cli = None
    try:
        lines = wait_for_line(monitor, "loading bundle")  # bound; the first status is out, alerts are seconds away
        cli = Cli(endpoint, "--jsonl", "--history", "--exit-on-stop", "--max-seconds", "400")
        cli.wait_message(lambda m: True, timeout_s=30)  # subscribed: the late-joiner status arrived
        log = run_dir / "alerts.jsonl"
        joined_before_any_alert = not log.exists() or log.stat().st_size == 0
        out, _ = monitor.communicate(timeout=300)  # ~15 s on an idle 2-core machine (eager: nothing to compile)
        rc = cli.finish(timeout_s=30)
    finally:
        monitor.kill()
        if cli is not None:
            cli.__exit__()
    assert monitor.returncode == 0, "".join(lines) + out
    assert rc == 0, cli.err
    printed = cli.messages()
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    alerts = alerts_of(printed)
    assert len(logged) >= 2 and {m["event"] for m in logged} >= {"start", "end"}
    assert [m["seq"] for m in alerts] == list(range(len(logged))), "every alert, in order, no gap"
    assert [{k: v for k, v in m.items() if k != "_replayed"} for m in alerts] == logged
    assert {m["topic"] for m in printed} == {"alert", "status"}  # the default --jsonl topics
    assert printed[-1]["topic"] == "status" and printed[-1]["state"] == "stopped"
    end = cli.notices()[-1]
    assert end["_client"] == "exit" and end["reason"] == "monitor_stopped", cli.err
    assert end["counters"]["unrecovered"] == 0 and end["counters"]["schema_errors"] == 0
    if joined_before_any_alert:  # then every alert came live: nothing was missed, nothing replayed
        assert end["counters"]["gaps"] == 0 and not any(m.get("_replayed") for m in alerts)
    assert "Traceback" not in "\n".join(cli.err)


# ---------------------------------------------------------------- gaps, replay, restarts
def test_history_replays_the_alerts_sent_before_the_subscriber_joined(endpoint: str, tmp_path: Path) -> None:
    with AlertPublisher(endpoint, run_dir=tmp_path / "run", heartbeat_interval=0.2) as pub:
        for event_id in range(5):
            pub.publish("alert", alert_payload(event_id))
        wait_sent(pub, "alert", 4)
        with Cli(endpoint, "--jsonl", "--history", "--exit-on-stop", "--max-seconds", "30") as cli:
            cli.wait_message(lambda m: m["topic"] == "alert" and m["seq"] == 4)
            for event_id in range(5, 7):
                pub.publish("alert", alert_payload(event_id))
            pub.publish("status", status_payload("stopped"))
            assert cli.finish() == 0, cli.err
    assert [(m["seq"], m.get("_replayed", False)) for m in alerts_of(cli.messages())] == \
        [(0, True), (1, True), (2, True), (3, True), (4, True), (5, False), (6, False)]
    gaps = cli.notices("gap")
    assert len(gaps) == 1 and gaps[0]["replayed"] == 5 and gaps[0]["unrecovered"] == 0
    assert cli.notices()[-1]["counters"]["replayed"] == 5


def test_alerts_dropped_while_the_subscriber_was_stalled_are_replayed_in_order(endpoint: str, tmp_path: Path) -> None:
    """The subscriber process is frozen (SIGSTOP) while a burst goes out; small send queues make the publisher drop."""
    total = 1500
    with AlertPublisher(endpoint, run_dir=tmp_path / "run", heartbeat_interval=0.2, sndhwm=10, sndbuf=16384) as pub:
        pub.publish("status", status_payload("running"))
        with Cli(endpoint, "--jsonl", "--exit-on-stop", "--max-seconds", "60") as cli:
            cli.wait_message(lambda m: m["topic"] == "status")
            os.kill(cli.proc.pid, signal.SIGSTOP)
            try:
                for event_id in range(total):
                    assert pub.publish("alert", alert_payload(event_id))
                wait_sent(pub, "alert", total - 1)
            finally:
                os.kill(cli.proc.pid, signal.SIGCONT)
            pub.publish("alert", alert_payload(total))  # live again: its seq reveals the gap, if no heartbeat did
            cli.wait_message(lambda m: m["topic"] == "alert" and m["seq"] == total, timeout_s=30)
            pub.publish("status", status_payload("stopped"))
            assert cli.finish() == 0, cli.err[-5:]
    alerts = alerts_of(cli.messages())
    assert [m["seq"] for m in alerts] == list(range(total + 1))
    assert [m["event_id"] for m in alerts] == list(range(total + 1))
    replayed = sum(1 for m in alerts if m.get("_replayed"))
    assert replayed > 0, "the burst was not lossy; the test proves nothing"
    gaps = cli.notices("gap")
    assert gaps and sum(g["replayed"] for g in gaps) == replayed and all(g["unrecovered"] == 0 for g in gaps)
    assert cli.notices()[-1]["counters"]["unrecovered"] == 0


def test_a_monitor_restart_is_shown_as_a_boot_change_in_the_live_view(endpoint: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Cli(endpoint, "--exit-on-stop", "--max-seconds", "30") as cli:
        first = AlertPublisher(endpoint, run_dir=run_dir, publisher_id="room-1", heartbeat_interval=0.2).start()
        try:
            cli.wait_for(cli.out, lambda line: "receiving from monitor room-1" in line)
            first.publish("alert", alert_payload(1))
            first.publish("status", status_payload("running"))  # after the alert: its notice says both arrived
            cli.wait_for(cli.out, lambda line: "monitor state ? → running" in line)
        finally:
            first.close()
        with AlertPublisher(endpoint, run_dir=run_dir, publisher_id="room-1", heartbeat_interval=0.2) as second:
            cli.wait_for(cli.out, lambda line: "restarted" in line)
            second.publish("alert", alert_payload(2))
            second.publish("status", status_payload("stopped"))
            assert cli.finish() == 0, cli.err
    out = "\n".join(cli.out)
    assert f"monitor room-1 restarted: boot {first.boot_id[:8]} → {second.boot_id[:8]}" in out
    assert "boot changes 1" in out and "gaps 0" in out and "Traceback" not in out + "\n".join(cli.err)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if re.match(r"\s*[12]\s+NBI\s", line)}
    assert rows["1"][-2:] == ["off", "no"] and rows["1"][-3] == "cut", "the old boot's open event never ended"
    assert rows["2"][-2:] == ["open", "no"]
    assert f"publisher   room-1 · boot {second.boot_id}" in out


# ---------------------------------------------------------------- bad input
def test_garbage_and_another_schema_version_are_reported_and_skipped(endpoint: str) -> None:
    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.linger = 0
    xpub.bind(endpoint)
    try:
        with Cli(endpoint, "--jsonl", "--topics", "alert", "--max-seconds", "30") as cli:
            subscribed: set[bytes] = set()
            while subscribed != {b"alert", b"status", b"heartbeat"}:  # alert asked for; the other two for health
                assert xpub.poll(15_000), f"the CLI never subscribed: {cli.err}"
                event = xpub.recv()
                if event[:1] == b"\x01":
                    subscribed.add(event[1:])
            valid = {"schema": SCHEMA, "topic": "alert", "publisher_id": "raw", "boot_id": "0" * 32, "seq": 0,
                     "t_wall_ns": 1, "t_mono_ns": 2, **alert_payload(9)}
            for frames in ([b"alert", b"\x00\x01garbage"], [b"alert"], [b"alert", b"{}", b"x"],
                           [b"alert", b"\xff" * 64], [b"status", b"[1, 2]"],
                           [b"heartbeat", b'{"schema": "cemd.monitor/1"}'],
                           encode("alert", dict(valid, schema="cemd.monitor/9", seq=5))):
                xpub.send_multipart(frames)
            xpub.send_multipart(encode("alert", valid))
            cli.wait_message(lambda m: m["topic"] == "alert")
            cli.wait_notice("schema_error")
            cli.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit
            assert cli.finish() == 0, cli.err
    finally:
        xpub.close()
        ctx.term()
    assert [(m["publisher_id"], m["seq"], m["event_id"]) for m in cli.messages()] == [("raw", 0, 9)]
    assert sum(n["skipped"] for n in cli.notices("schema_error")) == 7
    reasons = " ".join(n["message"] for n in cli.notices("schema_error"))
    assert any(r in reasons for r in ("expected 2 frames", "major version 9", "not UTF-8 JSON",
                                      "must be a JSON object", "lacks the common field")), reasons
    end = cli.notices()[-1]
    assert end["reason"] == "interrupted" and end["counters"]["schema_errors"] == 7
    assert "Traceback" not in "\n".join(cli.err)


def test_unreachable_endpoint_reports_silence_and_exits_at_max_seconds(endpoint: str) -> None:
    r = subprocess.run([sys.executable, "-m", "realtime.cli", "subscribe", endpoint, "--max-seconds", "3.6"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert re.search(rf"no messages from {endpoint} for \d+ s — is the monitor running", r.stdout), r.stdout
    assert "If it uses CURVE, pass --curve-secret" in r.stdout
    assert f"nothing accepts connections at {endpoint}" in r.stdout
    assert "stopped (max seconds)" in r.stdout


def test_wrong_curve_keys_receive_nothing_and_say_why(endpoint: str, tmp_path: Path) -> None:
    server_pub, server_secret = generate_keypair(tmp_path / "server", "monitor")
    client_pub, client_secret = generate_keypair(tmp_path / "client", "station")
    rogue_pub, rogue_secret = generate_keypair(tmp_path / "rogue", "rogue")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "station.key").write_bytes(client_pub.read_bytes())
    cases = {  # name: (options, what the connection notice must say)
        "allowed": (["--curve-secret", str(client_secret), "--curve-server-key", str(server_pub)], "(CURVE)"),
        "unknown key": (["--curve-secret", str(rogue_secret), "--curve-server-key", str(server_pub)],
                        "rejected this client's CURVE key"),
        "wrong server key": (["--curve-secret", str(client_secret), "--curve-server-key", str(rogue_pub)],
                             "--curve-server-key is not this monitor's public key"),
        "no keys": ([], "the monitor requires CURVE"),
    }
    with AlertPublisher(endpoint, run_dir=tmp_path / "run", heartbeat_interval=0.5,
                        curve=CurveServerConfig(server_secret, allow)) as pub:
        pub.publish("status", status_payload("running"))
        wait_sent(pub, "status", 0)
        clis = {}
        try:
            for name, (options, _) in cases.items():
                clis[name] = Cli(endpoint, "--jsonl", "--max-seconds", "3.6", *options)
            codes = {name: cli.finish(30) for name, cli in clis.items()}
        finally:
            for cli in clis.values():
                cli.__exit__()
    for name, (_, diagnosis) in cases.items():
        cli = clis[name]
        assert codes[name] == 0 and "Traceback" not in "\n".join(cli.err), (name, cli.err)
        assert any(diagnosis in n["message"] for n in cli.notices("connection")), (name, cli.err)
        if name == "allowed":
            assert [m["state"] for m in cli.messages()] == ["running"] and not cli.notices("silence")
            continue
        assert cli.out == [], name
        silence = cli.notices("silence")
        assert silence and re.match(rf"no messages from {endpoint} for \d+ s", silence[0]["message"]), (name, cli.err)
        assert "CURVE" in silence[0]["message"] and diagnosis in silence[0]["message"]


@pytest.mark.parametrize("args, message", [
    (["--curve-secret", "nope/station.key_secret", "--curve-server-key", "nope/monitor.key"],
     r"client secret key file nope/station\.key_secret: it does not exist; make a key pair with `cemd keys"),
    (["--curve-secret", "nope/station.key_secret"], r"CURVE needs both --curve-secret .* and --curve-server-key"),
    (["--jsonl", "--topics", "alert,scores"], rf"unknown topic\(s\) scores; choose from {','.join(TOPICS)} or 'all'"),
    (["--replay", "bogus"], r"--replay 'bogus' is not an endpoint ZeroMQ can connect to"),
    (["--topics", "alert"], r"--topics chooses what --jsonl prints"),
    (["--max-seconds", "0"], r"--max-seconds must be > 0"),
    (["ENDPOINT=localhost:5556"], r"'localhost:5556' is not tcp://HOST:PORT .* --replay EP"),
])
def test_bad_options_give_one_clear_message_and_exit_2(endpoint: str, args: list[str], message: str) -> None:
    target = [a.removeprefix("ENDPOINT=") for a in args if a.startswith("ENDPOINT=")] or [endpoint]
    options = [a for a in args if not a.startswith("ENDPOINT=")]
    r = subprocess.run([sys.executable, "-m", "realtime.cli", "subscribe", *target, *options], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(message, r.stderr.replace("\n", " ")), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")


# ---------------------------------------------------------------- the documented plain-pyzmq client
def test_docs_example_client_prints_the_alerts_it_is_sent(endpoint: str, tmp_path: Path) -> None:
    example = REPO / "docs" / "example_client.py"
    source = example.read_text()
    assert len(source.splitlines()) <= 15
    assert not re.search(r"^\s*(from|import)\s+(engine|realtime|calibration)\b", source, re.M), "plain pyzmq only"
    assert source.strip() in (REPO / "docs" / "CLIENTS.md").read_text(), "docs/CLIENTS.md shows the tested file"
    with AlertPublisher(endpoint, run_dir=tmp_path / "run", heartbeat_interval=0.2) as pub:
        proc = subprocess.Popen([sys.executable, str(example), endpoint], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=""))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 15
            while not lines and time.monotonic() < deadline and proc.poll() is None:
                pub.publish("alert", alert_payload(7))  # again until it has joined (a SUB misses what came before)
                time.sleep(0.2)
        finally:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            reader.join(5)
    assert lines, err
    assert re.fullmatch(r"alert \d+: start event 7 nbi frame 7 peak 0\.93\n", lines[0]), lines[0]


def test_clients_doc_names_every_option() -> None:
    import argparse

    from realtime.clients import subscribe

    commands = argparse.ArgumentParser(prog="cemd").add_subparsers()
    subscribe.register(commands)
    options = set(re.findall(r"--[a-z][a-z-]+", commands.choices["subscribe"].format_help())) - {"--help"}
    assert len(options) >= 9, options
    doc = (REPO / "docs" / "CLIENTS.md").read_text()
    missing = sorted(o for o in options if f"`{o}" not in doc)
    assert not missing, f"docs/CLIENTS.md does not describe {missing}"
