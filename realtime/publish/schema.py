"""Wire format of the monitor's messages: multipart ``[topic, compact JSON]``.

One module owns encoding and validation so that the publisher, the log, the clients and
the tests agree on one definition (described for humans in docs/SCHEMA.md and for
machines in docs/schema/cemd-monitor-v1.schema.json). Readers reject another major
version and ignore unknown fields, so minor additions never break a deployed client.
"""

from __future__ import annotations

import json
import math
from typing import Any

from engine.errors import CemdError, shown

SCHEMA = "cemd.monitor/1"
SCHEMA_NAME, _, _MAJOR_TEXT = SCHEMA.partition("/")
SCHEMA_MAJOR = int(_MAJOR_TEXT)
TOPICS = ("alert", "score", "status", "heartbeat", "map")
PIPELINE_TOPICS = tuple(t for t in TOPICS if t != "heartbeat")  # heartbeats are the publisher's own
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"  # where the monitor publishes and clients connect by default
# A replay reply holds at most this many bytes (the publisher cuts its chunk to fit and says "more");
# the client's replay socket drops a larger one (ZMQ_MAXMSGSIZE), so a hostile server can't make it buffer more.
REPLAY_MAX_REPLY = 16 << 20

# Fields every message carries, with the Python types a reader may rely on.
COMMON_FIELDS: dict[str, type] = {
    "schema": str,
    "topic": str,
    "publisher_id": str,
    "boot_id": str,
    "seq": int,
    "t_wall_ns": int,
    "t_mono_ns": int,
}

# Fields the pipeline fills per topic (the publisher adds the common ones). Documentation
# and tests use this list; `decode` does not require them, so that a reader keeps working
# when the producer is older or newer.
TOPIC_FIELDS: dict[str, tuple[str, ...]] = {
    "score": ("frame_id", "pts", "time_base", "t_capture_wall_ns", "t_capture_mono_ns", "timings_ms",
              "modality", "modality_mode", "backend", "score", "threshold", "event_state", "event_id",
              "location"),
    "alert": ("event", "event_id", "modality", "frame_id", "pts", "start_frame_id", "end_frame_id",
              "score", "peak_score", "peak_frame_id", "threshold", "duration_ms", "location"),
    "status": ("state", "source", "scorer", "open_events", "message"),
    "heartbeat": ("uptime_s", "state", "last_frame_id", "last_seq"),
    "map": ("frame_id", "modality", "box", "size", "vmax", "encoding", "data", "location"),
}


def replay_endpoint_for(endpoint: str) -> str:
    """The replay (REQ/ROUTER) endpoint paired with a publish endpoint: same host, port + 1."""
    transport, _, address = endpoint.partition("://")
    if transport == "tcp":
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and int(port) < 65535:
            return f"tcp://{host}:{int(port) + 1}"
    elif transport == "ipc" and address:
        return f"{endpoint}.replay"
    raise CemdError(
        f"cannot derive a replay endpoint from {endpoint!r}; use tcp://HOST:PORT (replay goes to PORT+1) "
        "or give the replay endpoint explicitly"
    )


class SchemaError(ValueError):
    """Bytes that are not a valid cemd.monitor/1 message (garbage, another major, missing fields)."""


def plain(value: Any) -> Any:
    """A JSON-ready copy: NaN/inf become null, numpy scalars and arrays become Python values.

    Scores come out of numpy; a NaN must reach the wire as null rather than as the
    non-standard token ``NaN`` that most JSON readers refuse.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return plain(tolist())
    raise TypeError(f"cannot put a {type(value).__name__} into a monitor message")


def dumps(value: Any) -> bytes:
    """Compact, strict JSON bytes (no NaN tokens): what ``plain(value)`` would give.

    Straight to the C encoder first (what it cannot encode, numpy values, goes through
    ``plain`` as met), since the score message is encoded between the decision and the send;
    the slower ``plain()`` copy of the whole value only when a NaN/inf or an odd key makes the
    fast path refuse.
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=plain).encode()
    except (ValueError, TypeError):
        return json.dumps(plain(value), separators=(",", ":"), allow_nan=False).encode()


def encode(topic: str, message: dict[str, Any]) -> list[bytes]:
    """Frames for one message: the topic alone in frame 0 so SUB prefix filters can't match into the JSON."""
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
    return [topic.encode(), dumps(message)]


def check_schema_version(schema: object) -> None:
    """Accept any ``cemd.monitor/1[.minor]``; name another major explicitly, since that needs a new reader."""
    if not isinstance(schema, str):
        raise SchemaError(f"field 'schema' must be a string like {SCHEMA!r}, got {shown(schema)}")
    name, _, version = schema.partition("/")
    if name != SCHEMA_NAME:
        raise SchemaError(f"not a {SCHEMA_NAME} message (schema {shown(schema)})")
    major_text = version.split(".", 1)[0]
    if not (major_text.isascii() and major_text.isdigit()) or len(major_text) > 9:  # int() of "²" or 5000 digits raises
        raise SchemaError(f"schema {shown(schema)} has no major version number")
    if int(major_text) != SCHEMA_MAJOR:
        raise SchemaError(
            f"message schema {shown(schema)} has major version {int(major_text)}; this reader understands "
            f"major {SCHEMA_MAJOR} only: upgrade the client (or run a monitor that speaks {SCHEMA})"
        )


MAX_SEQ = 2**63 - 1  # seqs are 64-bit counters: a larger one is no monitor's (a gap of 10**400 is junk, not loss)
MAX_DEPTH = 32  # JSON nesting a message may have (ours have under 8): a deeper one would recurse in a reader's code


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays deeper than ``limit`` (iterative: no recursion of its own)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def validate(message: object, topic: str | None = None) -> dict[str, Any]:
    """Check the parts of a decoded message that readers rely on; return it unchanged."""
    if not isinstance(message, dict):
        raise SchemaError(f"a message must be a JSON object, got {type(message).__name__}")
    if _depth_over(message, MAX_DEPTH):
        raise SchemaError(f"message nests deeper than {MAX_DEPTH} levels")
    check_schema_version(message.get("schema"))
    for field, kind in COMMON_FIELDS.items():
        if field not in message:
            raise SchemaError(f"message lacks the common field {field!r}")
        value = message[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise SchemaError(f"field {field!r} must be {kind.__name__}, got {shown(value)}")
    if message["topic"] not in TOPICS:
        raise SchemaError(f"unknown topic {shown(message['topic'])}")
    if topic is not None and message["topic"] != topic:
        raise SchemaError(f"frame topic {topic!r} differs from the JSON topic {shown(message['topic'])}")
    if not 0 <= message["seq"] <= MAX_SEQ:
        raise SchemaError(f"seq must be from 0 to {MAX_SEQ}, got {shown(message['seq'])}")
    if message["topic"] == "heartbeat" and not isinstance(message.get("last_seq", {}), dict):
        raise SchemaError("heartbeat field 'last_seq' must be an object {topic: seq}")
    return message


def decode(frames: list[bytes]) -> dict[str, Any]:
    """Parse one received multipart message; any defect is a SchemaError, never another exception."""
    if len(frames) != 2:
        raise SchemaError(f"expected 2 frames [topic, json], got {len(frames)}")
    try:
        topic = bytes(frames[0]).decode("ascii")
    except UnicodeDecodeError:
        raise SchemaError("topic frame is not ASCII") from None
    if topic not in TOPICS:
        raise SchemaError(f"unknown topic {shown(topic)}")
    try:
        message = json.loads(bytes(frames[1]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SchemaError(f"{topic} body is not UTF-8 JSON: {exc}") from None
    return validate(message, topic)
