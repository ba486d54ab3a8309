"""Print a cemd monitor's alerts. Usage: python docs/example_client.py [tcp://127.0.0.1:5556]"""
import json, re, sys  # noqa: E401 — one line, so that the whole example fits in 15
import zmq

sub = zmq.Context().socket(zmq.SUB)
sub.connect(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5556")
sub.setsockopt(zmq.SUBSCRIBE, b"alert")
while True:
    try:
        m = json.loads(sub.recv_multipart()[-1])
        if re.fullmatch(r"cemd\.monitor/1(\.\d+)?", str(m.get("schema"))):  # skip another major version
            print(f"alert {m['seq']}: {m['event']} event {m['event_id']} {m['modality']} frame {m['frame_id']} "
                  f"peak {m['peak_score']}", flush=True)
    except (ValueError, AttributeError, KeyError):  # not JSON, not an object, or lacks a field
        print("skipped a message that is not a cemd.monitor/1 alert", file=sys.stderr, flush=True)
