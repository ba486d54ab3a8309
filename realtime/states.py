"""The states a source and the monitor go through (strings on the wire: docs/SCHEMA.md, ``status``)."""

from enum import StrEnum


class SourceState(StrEnum):
    """The capture's view of its source."""

    NEW = "new"  # not started
    OPENING = "opening"
    RUNNING = "running"  # frames are arriving
    STALLED = "stalled"  # no frame for --stall-after-s
    RECONNECTING = "reconnecting"  # a live source is being reopened
    ENDED = "ended"  # a file (or a sender) reached its end
    ERROR = "error"  # gave up: the message says why


class MonitorState(StrEnum):
    """The pipeline's state in every status message."""

    STARTING = "starting"  # publisher up, model loading
    RUNNING = "running"
    DEGRADED = "degraded"  # a fault: the message says which
    STOPPED = "stopped"


SOURCE_FAULTS = (SourceState.STALLED, SourceState.RECONNECTING, SourceState.ERROR)
