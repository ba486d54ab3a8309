"""`cemd subscribe [ENDPOINT]`: watch a running monitor's alerts and health from another terminal or machine.

Built on ``MonitorClient``, which detects seq gaps and boot changes and replays missed alerts.
This module only shows what the client receives and notices: a rich live view, or JSON lines
(``--jsonl``) for other tools. The problems it reports are silence, refused connections or keys,
gaps, restarts and garbage; it keeps running through all of them. See docs/CLIENTS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import zmq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from engine.errors import CemdError
from realtime.clients.client import CurveClientConfig, MonitorClient
from realtime.publish.schema import DEFAULT_ENDPOINT, TOPICS, dumps, replay_endpoint_for

JSONL_TOPICS = ("alert", "status")  # what --jsonl prints unless --topics says otherwise
SILENCE_S = 3.0  # no valid message for this long (or 3 heartbeat intervals, if longer): say so
TICK_S = 0.25  # longest wait between checks (silence, deadline, signals) and between redraws
REPEAT_S = 10.0  # a problem that goes on (silence) is reported again this often
THROTTLE_S = 1.0  # skipped/missed messages are reported at most this often, summed
EVENT_ROWS = 12  # alert events shown in the live table
LOG_LINES = 8  # notices shown in the live event log

_STATE_STYLE = {"running": "bold green", "starting": "yellow", "degraded": "bold red", "stopped": "dim",
                "opening": "yellow", "stalled": "bold red", "reconnecting": "bold yellow", "ended": "dim",
                "error": "bold red", "open": "bold red", "cut off": "yellow"}
_LEVEL_STYLE = {"info": "cyan", "warning": "bold yellow", "error": "bold red"}
_COUNTERS = ("gaps", "replayed", "unrecovered", "replay_failures", "boot_changes", "schema_errors", "duplicates")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONNECTION_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
                      | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


# ---------------------------------------------------------------- the client, with connection diagnosis
class WatchedClient(MonitorClient):
    """A MonitorClient that also reads its SUB socket's connection events.

    Silence alone cannot tell "nothing listens there" from "the monitor refused our key";
    libzmq's socket monitor can, so the user is told which one it is.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tcp_connected = False
        self.connection: tuple[str, str] | None = None  # (state, explanation), None until known

    def connection_changes(self, curve: bool) -> list[tuple[str, str]]:
        """New (state, explanation) diagnoses since the last call, from the socket's events (MonitorClient reads them)."""
        changes = []
        self.watch_connection()
        while self.connection_events:
            event = self.connection_events.popleft()
            if not event & _CONNECTION_EVENTS:
                continue
            diagnosis = self._diagnose(event, curve)
            if diagnosis is not None and diagnosis != self.connection:
                self.connection = diagnosis
                changes.append(diagnosis)
        return changes

    def _diagnose(self, event: int, curve: bool) -> tuple[str, str] | None:
        where = self.endpoint
        if event == zmq.EVENT_CONNECTED:
            self.tcp_connected = True
            return None  # wait for the handshake's verdict
        if event == zmq.EVENT_CONNECT_RETRIED:
            refused = not self.tcp_connected  # a retry after a failed handshake is not a refusal
            self.tcp_connected = False
            if refused:
                return "refused", f"nothing accepts connections at {where} (is the monitor running there?); retrying"
            return None
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return "connected", f"connected to {where}" + (" (CURVE)" if curve else "")
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return "rejected", ("the monitor rejected this client's CURVE key: copy this client's public .key into "
                                "the monitor's --curve-allow folder and restart the monitor")
        if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            if curve:
                return "handshake_failed", ("CURVE handshake failed: --curve-server-key is not this monitor's public "
                                            "key, or the monitor runs without CURVE")
            return "handshake_failed", ("handshake failed: the monitor requires CURVE (pass --curve-secret and "
                                        "--curve-server-key), or the peer is not a cemd monitor")
        if event == zmq.EVENT_DISCONNECTED and self.connection is not None and self.connection[0] == "connected":
            return "disconnected", f"connection to {where} lost; reconnecting"
        return None


# ---------------------------------------------------------------- what the client received and noticed
def notice(kind: str, level: str, message: str, **fields: Any) -> dict[str, Any]:
    """One problem or event of the client itself (``--jsonl`` writes it to stderr as one JSON line)."""
    return {"_client": kind, "level": level, "message": message, "t_wall_ns": time.time_ns(), **fields}


class Subscription:
    """Receives from a MonitorClient and turns its counters and silences into notices."""

    def __init__(self, client: WatchedClient, curve: bool) -> None:
        self.client = client
        self.curve = curve
        self.interval_s = 1.0  # the monitor's heartbeat period, as its heartbeats say
        self.silent = False
        self.received: collections.Counter[str] = collections.Counter()  # messages received per topic
        self.replayed_alerts = 0
        self.boots: dict[str, str] = {}  # publisher_id -> current boot_id
        self.state: Any = None  # the monitor's last status state: a string (a junk one's text), or None
        self._counts = self.counters()
        self._reported_lost: collections.Counter[str] = collections.Counter()
        self._reported_schema = 0
        self._last_said: dict[str, float] = {}

    def counters(self) -> dict[str, Any]:
        c = self.client
        return {**{name: getattr(c, name) for name in _COUNTERS}, "lost": dict(c.lost)}

    def receive(self, timeout_s: float) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The next message (or None after ``timeout_s``) and the notices that go before it."""
        message = self.client.recv(timeout_s=timeout_s)
        notices = [notice("connection", "info" if state == "connected" else "error", text, state=state,
                          endpoint=self.client.endpoint)
                   for state, text in self.client.connection_changes(self.curve)]
        notices += self._counter_notices()
        if message is not None:
            notices += self._observe(message)
        notices += self._silence_notices()
        return message, notices

    def flush(self) -> list[dict[str, Any]]:
        """Notices still held back by throttling (at exit)."""
        return self._counter_notices(force=True)

    def silence_limit_s(self) -> float:
        return max(SILENCE_S, 3 * self.interval_s)

    def silence_text(self) -> str:
        silent = self.client.silent_for_s()
        if self.curve:
            hint = ("is the monitor running? If it is, check the CURVE keys: this client's public key must be in the "
                    "monitor's --curve-allow folder, and --curve-server-key must be the monitor's public key")
        else:
            hint = ("is the monitor running and publishing there? If it uses CURVE, pass --curve-secret and "
                    "--curve-server-key")
        text = f"no messages from {self.client.endpoint} for {silent:.0f} s — {hint}"
        if self.client.connection is not None and self.client.connection[0] != "connected":
            text += f" [{self.client.connection[1]}]"
        return text

    # ------------------------------------------------------------------ internals
    def _observe(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        notices = []
        topic, publisher, boot = message["topic"], message["publisher_id"], message["boot_id"]
        self.received[topic] += 1
        known = self.boots.get(publisher)
        if message.get("_replayed"):
            self.replayed_alerts += 1
            if known is not None:  # replays may come from an old boot; they say nothing about the current one
                return notices
        if known is None:
            notices.append(notice("publisher", "info",
                                  f"receiving from monitor {_short(publisher)} (boot {_short(boot[:8])})",
                                  publisher_id=publisher, boot_id=boot))
        elif known != boot:
            notices.append(notice("boot_change", "warning",
                                  f"monitor {_short(publisher)} restarted: boot {_short(known[:8])} → "
                                  f"{_short(boot[:8])}; its seqs start again at 0 (not a gap)",
                                  publisher_id=publisher, old_boot_id=known, boot_id=boot))
        self.boots[publisher] = boot
        if topic == "heartbeat":
            interval = message.get("interval_s")
            if isinstance(interval, (int, float)) and not isinstance(interval, bool) and 0 < interval < 3600:
                self.interval_s = float(interval)
        elif topic == "status":
            state = message.get("state")
            if state is not None and not isinstance(state, str):  # a misbehaving monitor: compare and show its text
                state = _short(state)
            if state != self.state:
                text = f"monitor state {_short(self.state or '?')} → {_short(state)}"
                if message.get("message"):
                    text += f": {_short(message['message'], 300)}"
                level = "info" if state in ("running", "starting", "stopped") else "warning"
                notices.append(notice("state", level, text, state=state, previous=self.state))
                self.state = state
        return notices

    def _counter_notices(self, force: bool = False) -> list[dict[str, Any]]:
        notices = []
        now, before, after = time.monotonic(), self._counts, self.counters()
        self._counts = after
        delta = {name: after[name] - before[name] for name in _COUNTERS}
        if delta["gaps"] or delta["replayed"] or delta["unrecovered"] or delta["replay_failures"]:
            parts = []
            if delta["gaps"]:
                parts.append(f"alert gap detected ({delta['gaps']})")
            parts.append(f"{delta['replayed']} missed alert(s) replayed from the monitor's log")
            if delta["unrecovered"]:
                parts.append(f"{delta['unrecovered']} could NOT be recovered")
            if delta["replay_failures"]:
                parts.append(f"{delta['replay_failures']} replay request(s) to {self.client.replay_endpoint} "
                             "failed (no answer)")
            level = "error" if delta["unrecovered"] or delta["replay_failures"] else "warning"
            notices.append(notice("gap", level, "; ".join(parts), **{k: delta[k] for k in
                                  ("gaps", "replayed", "unrecovered", "replay_failures")}))
        if after["schema_errors"] > self._reported_schema and (force or self._due("schema", now)):
            n = after["schema_errors"] - self._reported_schema
            self._reported_schema = after["schema_errors"]
            notices.append(notice("schema_error", "warning",
                                  f"skipped {n} message(s) that are not valid cemd.monitor/1 (last: "
                                  f"{getattr(self.client, 'last_schema_error', None) or 'garbage or another schema version'}"
                                  f"); {after['schema_errors']} so far",
                                  skipped=n, schema_errors=after["schema_errors"]))
        missed = {t: n - self._reported_lost[t] for t, n in after["lost"].items() if n > self._reported_lost[t]}
        if missed and (force or self._due("lost", now)):
            self._reported_lost.update(missed)
            text = ", ".join(f"{n} {t}" for t, n in sorted(missed.items()))
            notices.append(notice("lost", "warning", f"missed {text} message(s) (only alerts can be replayed)",
                                  lost=missed))
        return notices

    def _due(self, kind: str, now: float) -> bool:
        if now - self._last_said.get(kind, -1e9) < THROTTLE_S:
            return False
        self._last_said[kind] = now
        return True

    def _silence_notices(self) -> list[dict[str, Any]]:
        silent, now = self.client.silent_for_s(), time.monotonic()
        if silent >= self.silence_limit_s():
            if not self.silent or now - self._last_said.get("silence", -1e9) >= REPEAT_S:
                self.silent = True
                self._last_said["silence"] = now
                return [notice("silence", "error", self.silence_text(), silent_s=round(silent, 1),
                               endpoint=self.client.endpoint)]
        elif self.silent:
            self.silent = False
            return [notice("resumed", "info", f"messages from {self.client.endpoint} again")]
        return []


# ---------------------------------------------------------------- outputs
class JsonlOutput:
    """One JSON object a line: messages on stdout, the client's own notices on stderr."""

    def __init__(self, topics: tuple[str, ...], out: TextIO, err: TextIO) -> None:
        self.topics = topics
        self.out, self.err = out, err

    def __enter__(self) -> JsonlOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def message(self, message: dict[str, Any]) -> None:
        if message["topic"] in self.topics:
            self.out.write(dumps(message).decode() + "\n")  # strict ASCII JSON: a NaN from the wire becomes null
            self.out.flush()

    def notice(self, item: dict[str, Any]) -> None:
        self.err.write(json.dumps(item, separators=(",", ":"), default=str) + "\n")
        self.err.flush()

    def tick(self, sub: Subscription) -> None:
        pass

    def finish(self, reason: str, sub: Subscription) -> None:
        self.notice(notice("exit", "info", f"stopped: {reason.replace('_', ' ')}", reason=reason,
                           received=dict(sub.received), replayed_alerts=sub.replayed_alerts, counters=sub.counters()))


class LiveOutput:
    """The rich live view: status panel, alert events table, event log."""

    def __init__(self, sub: Subscription, console: Console) -> None:
        self.sub = sub
        self.console = console
        self.view = LiveView(sub)
        self._live: Live | None = None
        self._drawn = 0.0

    def _render(self) -> RenderableType:
        try:
            return self.view.render()
        except Exception as exc:  # noqa: BLE001 — same: show the fault, keep receiving
            return Text(f"display error: {exc!r}", style="bold red")

    def __enter__(self) -> LiveOutput:
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None
            if not self.console.is_terminal:
                self.console.line()  # rich ends a file's final frame without one

    def message(self, message: dict[str, Any]) -> None:
        try:
            self.view.add(message)
        except Exception as exc:  # noqa: BLE001 — a message the view can't show must not end the watch
            self.notice(notice("display_error", "warning", f"cannot show a {message['topic']} message: {exc!r}"))

    def notice(self, item: dict[str, Any]) -> None:
        self.view.note(item)
        if not self.console.is_terminal:  # a log file gets each notice as it happens
            self.console.print(self.view.log[-1], soft_wrap=True)

    def tick(self, sub: Subscription) -> None:
        now = time.monotonic()
        if self._live is not None and now - self._drawn >= TICK_S:
            self._drawn = now
            self._live.update(self._render(), refresh=True)

    def finish(self, reason: str, sub: Subscription) -> None:
        c = sub.counters()
        self.console.print(
            f"stopped ({reason.replace('_', ' ')}): {sub.received['alert']} alert messages "
            f"({sub.replayed_alerts} replayed) · gaps {c['gaps']} · unrecovered {c['unrecovered']} · "
            f"boot changes {c['boot_changes']} · schema errors {c['schema_errors']}", soft_wrap=True)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    """A wire value for display: no terminal control codes or lone surrogates from the network."""
    if value is None or isinstance(value, str) and value == "":
        return "–"
    try:
        text = str(value)
    except (ValueError, RecursionError):  # a structure nested too deep to print
        text = f"<{type(value).__name__}>"
    return _CONTROL.sub("\ufffd", text)


def _short(value: Any, limit: int = 120) -> str:
    """A wire value inside a notice: one line (no control codes), at most ``limit`` characters."""
    text = "None" if value is None else _text(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _number(value: Any, spec: str = ".4f", scale: float = 1.0) -> str:
    """A wire number for display (divided by ``scale``); "–" for a non-number, NaN, ±inf or an int too big for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    try:
        value = float(value) / scale
    except OverflowError:  # JSON ints have no size limit: 10**400 is valid on the wire
        return "–"
    return format(value, spec) if math.isfinite(value) else "–"


class LiveView:
    """What the live view shows, updated from messages and notices; never trusts a field's type."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.status: dict[str, Any] = {}
        self.heartbeat: dict[str, Any] = {}
        self.heartbeat_at: float | None = None
        self.publisher: tuple[str, str] | None = None
        self.events: collections.OrderedDict[tuple[str, str, str], dict[str, Any]] = collections.OrderedDict()
        self.log: collections.deque[Text] = collections.deque(maxlen=LOG_LINES)

    def add(self, message: dict[str, Any]) -> None:
        topic = message["topic"]
        if not message.get("_replayed"):
            self.publisher = (message["publisher_id"], message["boot_id"])
        if topic == "status":
            self.status = message
        elif topic == "heartbeat":
            self.heartbeat, self.heartbeat_at = message, time.monotonic()
        elif topic == "alert":
            self._add_alert(message)

    def _add_alert(self, m: dict[str, Any]) -> None:
        key = (m["publisher_id"], m["boot_id"], repr(m.get("event_id")))
        row = self.events.get(key)
        if row is None:
            row = self.events[key] = {"id": m.get("event_id"), "boot": m["boot_id"], "replayed": False,
                                      "start": m.get("start_frame_id")}
            while len(self.events) > 1000:
                self.events.popitem(last=False)
        event = m.get("event")
        row["modality"] = m.get("modality", row.get("modality"))
        if m.get("start_frame_id") is not None:
            row["start"] = m["start_frame_id"]
        row["last"] = m.get("end_frame_id") if event == "end" and m.get("end_frame_id") is not None \
            else m.get("frame_id")
        row["peak"] = m.get("peak_score")
        row["duration_ms"] = m.get("duration_ms")
        row["state"] = "ended" if event == "end" else "open"
        row["replayed"] = row["replayed"] or bool(m.get("_replayed"))

    def note(self, item: dict[str, Any]) -> None:
        if item["_client"] == "boot_change":  # an event the old boot left open will never end
            for (publisher, boot, _), row in self.events.items():
                if publisher == item["publisher_id"] and boot == item["old_boot_id"] and row["state"] == "open":
                    row["state"] = "cut off"
        stamp = time.strftime("%H:%M:%S")
        self.log.append(Text.assemble((f"{stamp} ", "dim"), (f"{item['_client']}: ", _LEVEL_STYLE[item["level"]]),
                                      _text(item["message"])))

    def render(self) -> RenderableType:
        sub = self.sub
        parts: list[RenderableType] = []
        if sub.client.silent_for_s() >= sub.silence_limit_s():
            parts.append(Panel(Text(sub.silence_text(), style="bold white"), style="on red",
                               title="NO MESSAGES", title_align="left"))
        elif self.status.get("state") not in (None, "running"):
            state = _text(self.status.get("state"))
            text = f"AI NOT ACTIVE — monitor {state}" + (f": {_text(self.status['message'])}"
                                                          if self.status.get("message") else "")
            parts.append(Text(text, style="dim" if state == "stopped" else "bold white on red"))
        parts += [self._status_panel(), self._events_table(),
                  Panel(Group(*self.log) if self.log else Text("nothing yet", style="dim"), title="event log",
                        title_align="left", border_style="dim")]
        return Group(*parts)

    def _status_panel(self) -> Panel:
        sub, status = self.sub, self.status
        src, scorer = _dict(status.get("source")), _dict(status.get("scorer"))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        state = _text(status.get("state"))
        line = Text(state.upper(), style=_STATE_STYLE.get(state, ""))
        if status.get("message"):
            line.append(f"  {_text(status['message'])}", style="bold red")
        grid.add_row("monitor", line)
        if src:
            sstate = _text(src.get("state"))
            grid.add_row("source", Text.assemble(
                (sstate, _STATE_STYLE.get(sstate, "")),
                f" · {_text(src.get('kind'))} {_text(src.get('target'))} · {_number(src.get('fps'), '.1f')} fps · "
                f"read {_text(src.get('frames_read'))} · dropped {_text(src.get('frames_dropped'))} · "
                f"decode errors {_text(src.get('decode_errors'))}"))
        if scorer:
            backends = ", ".join(f"{_text(m).upper()} {_text(b)}" for m, b in _dict(scorer.get("backends")).items()
                                 if b is not None)  # a branch not loaded is null
            failed = scorer.get("frames_failed")
            grid.add_row("scoring", Text.assemble(
                f"modality {_text(scorer.get('modality')).upper()} ({_text(scorer.get('modality_mode'))}) · "
                f"backend {backends or '–'} · {_number(scorer.get('fps'), '.1f')} fps scored",
                (f" · {_text(failed)} frames failed", "bold red") if failed else ""))
        if self.heartbeat_at is None:
            beat = Text("none yet", style="yellow")
        else:
            beat = Text(f"{time.monotonic() - self.heartbeat_at:.1f} s ago · monitor up "
                        f"{_number(self.heartbeat.get('uptime_s'), '.0f')} s · last frame "
                        f"{_text(self.heartbeat.get('last_frame_id'))}")
        grid.add_row("heartbeat", beat)
        if self.publisher is not None:
            grid.add_row("publisher", Text(f"{_text(self.publisher[0])} · boot {_text(self.publisher[1])}"))
        conn = sub.client.connection
        grid.add_row("connection", Text(conn[1], style="" if conn[0] == "connected" else "bold red")
                     if conn else Text(f"connecting to {sub.client.endpoint}", style="yellow"))
        c = sub.counters()
        lost = sum(c["lost"].values())
        grid.add_row("counters", Text.assemble(
            f"alerts {sub.received['alert']} · ",
            (f"gaps {c['gaps']}", "bold yellow" if c["gaps"] else ""), f" · replayed {c['replayed']} · ",
            (f"unrecovered {c['unrecovered']}", "bold red" if c["unrecovered"] else ""),
            f" · replay failures {c['replay_failures']} · ",
            (f"boot changes {c['boot_changes']}", "bold yellow" if c["boot_changes"] else ""), " · ",
            (f"schema errors {c['schema_errors']}", "bold yellow" if c["schema_errors"] else ""),
            f" · other messages missed {lost}"))
        return Panel(grid, title=Text(f"cemd subscribe {sub.client.endpoint}"), title_align="left",
                     border_style="blue")

    def _events_table(self) -> Table:
        n_open = sum(row["state"] == "open" for row in self.events.values())
        table = Table(title=f"alert events ({len(self.events)}, {n_open} open)", title_justify="left",
                      box=None, padding=(0, 1))
        for col in ("event", "modality", "start frame", "last frame", "peak score", "duration", "state", "replayed"):
            table.add_column(col, justify="right" if col in ("start frame", "last frame", "peak score", "duration")
                             else "left")
        for row in list(self.events.values())[-EVENT_ROWS:]:
            duration = row.get("duration_ms")
            cells = (_text(row["id"]), _text(row.get("modality")).upper(), _text(row.get("start")),
                     _text(row.get("last")), _number(row.get("peak")),
                     seconds if (seconds := _number(duration, ".1f", 1000)) == "–" else f"{seconds} s")
            table.add_row(*(Text(cell) for cell in cells),  # Text: a wire value is never read as rich markup
                          Text(row["state"], style=_STATE_STYLE.get(row["state"], "")),
                          Text("yes", style="yellow") if row["replayed"] else Text("no"))
        return table


# ---------------------------------------------------------------- the command
def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cemd subscribe`` to the command line."""
    p = sub.add_parser(
        "subscribe",
        help="watch a running monitor: live alert table and stream status, or JSON lines (--jsonl)",
        description="Subscribe to a running monitor's alerts and status. Detects seq gaps and monitor restarts, "
                    "fetches missed alerts from the monitor's log, and keeps running (and says why) when nothing "
                    "arrives. See docs/CLIENTS.md.",
    )
    p.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"the monitor's --publish endpoint (default {DEFAULT_ENDPOINT})")
    p.add_argument("--replay", metavar="EP", help="the monitor's replay endpoint (default: the publish port + 1)")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object a line on stdout per message (the client's own notices go to "
                        "stderr as JSON lines with a \"_client\" field) instead of the live view")
    p.add_argument("--topics", metavar="LIST",
                   help=f"with --jsonl: comma-separated topics to print, from {','.join(TOPICS)} or 'all' "
                        f"(default {','.join(JSONL_TOPICS)})")
    p.add_argument("--history", action="store_true",
                   help="also fetch the alerts the monitor sent (in its current run) before this client joined")
    p.add_argument("--curve-secret", type=Path, metavar="FILE",
                   help="this client's NAME.key_secret (from `cemd keys`), when the monitor uses CURVE")
    p.add_argument("--curve-server-key", type=Path, metavar="FILE", help="the monitor's public .key file")
    p.add_argument("--max-seconds", type=float, metavar="S", help="exit (status 0) after S seconds")
    p.add_argument("--exit-on-stop", action="store_true",
                   help="exit (status 0) when the monitor publishes its final status (state \"stopped\")")
    p.set_defaults(func=run)


def parse_topics(text: str | None) -> tuple[str, ...]:
    if text is None:
        return JSONL_TOPICS
    if text.strip() == "all":
        return TOPICS
    topics = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in topics if t not in TOPICS]
    if unknown or not topics:
        raise CemdError(f"--topics {text!r}: unknown topic(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {','.join(TOPICS)} or 'all'")
    return topics


def open_client(args: argparse.Namespace, topics: tuple[str, ...]) -> WatchedClient:
    """The client for the parsed options; CemdError (exit 2) for anything the user must fix."""
    if (args.curve_secret is None) != (args.curve_server_key is None):
        raise CemdError("CURVE needs both --curve-secret (this client's NAME.key_secret) and --curve-server-key "
                        "(the monitor's public .key); make keys with `cemd keys --out DIR --name NAME`")
    curve = CurveClientConfig(args.curve_secret, args.curve_server_key) if args.curve_secret else None
    if args.replay is None:
        try:
            replay_endpoint_for(args.endpoint)
        except CemdError:
            raise CemdError(f"endpoint {args.endpoint!r} is not tcp://HOST:PORT or ipc://PATH; for another "
                            "transport give the replay endpoint with --replay EP") from None
    _check_endpoint(args.endpoint, "ENDPOINT")
    if args.replay is not None:  # the client connects it only at the first gap: check it now
        _check_endpoint(args.replay, "--replay")
    try:
        return WatchedClient(args.endpoint, args.replay, topics=topics, curve=curve, history=args.history)
    except zmq.ZMQError as exc:
        raise CemdError(f"cannot connect to {args.endpoint}: {exc.strerror}; use tcp://HOST:PORT, "
                        "e.g. tcp://127.0.0.1:5556") from None


def _check_endpoint(endpoint: str, option: str) -> None:
    """CemdError unless ZeroMQ accepts ``endpoint`` (connecting is asynchronous: nothing needs to listen yet)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise CemdError(f"{option} {endpoint!r} is not an endpoint ZeroMQ can connect to ({exc.strerror}); "
                        "use tcp://HOST:PORT, e.g. tcp://127.0.0.1:5556") from None
    finally:
        sock.close(linger=0)
        ctx.term()


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``cemd subscribe``: 0 when it stops (deadline, final status, Ctrl-C, SIGTERM); 2 for bad options."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if args.max_seconds is not None and not args.max_seconds > 0:
        raise CemdError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.topics is not None and not args.jsonl:
        raise CemdError("--topics chooses what --jsonl prints; the live view always shows alerts and status")
    shown = parse_topics(args.topics) if args.jsonl else ("alert", "status")
    # Status and heartbeats always: they carry the health shown, the liveness and the last alert's seq.
    client = open_client(args, tuple(t for t in TOPICS if t in shown or t in ("status", "heartbeat")))
    sub = Subscription(client, curve=args.curve_secret is not None)
    output: JsonlOutput | LiveOutput = (JsonlOutput(shown, out, err) if args.jsonl
                                        else LiveOutput(sub, Console(file=out)))
    terminated: list[int] = []
    previous = _on_sigterm(lambda signum, _frame: terminated.append(signum))
    try:
        if args.jsonl:
            output.notice(notice("subscribed", "info", f"subscribed to {client.endpoint}", endpoint=client.endpoint,
                                 replay_endpoint=client.replay_endpoint, topics=list(shown),
                                 curve=sub.curve, history=args.history))
        try:
            with output:
                reason = _loop(sub, output, args, terminated)
        except KeyboardInterrupt:  # Ctrl-C: a normal way to stop watching
            reason = "interrupted"
        for item in sub.flush():
            output.notice(item)
        output.finish(reason, sub)
    except BrokenPipeError:  # `cemd subscribe --jsonl | head`: the reader is gone, which is not an error
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        except (OSError, ValueError):
            pass
    finally:
        _on_sigterm(previous)
        client.close()
    return 0


def _loop(sub: Subscription, output: JsonlOutput | LiveOutput, args: argparse.Namespace,
          terminated: list[int]) -> str:
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    while True:
        if terminated:
            return "terminated"
        wait = TICK_S if deadline is None else max(0.0, min(TICK_S, deadline - time.monotonic()))
        message, notices = sub.receive(wait)
        for item in notices:
            output.notice(item)
        if message is not None:
            output.message(message)
        output.tick(sub)
        if (message is not None and args.exit_on_stop and message["topic"] == "status"
                and message.get("state") == "stopped" and not message.get("_replayed")):
            return "monitor_stopped"
        if deadline is not None and time.monotonic() >= deadline:
            return "max_seconds"


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM; the previous handler (None where signals can't be set: not main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None
