"""Records a real vLLM's KV-event stream, frame by frame, as the gateway receives it.

    python3 scripts/real-vllm/record-kv-events.py tcp://127.0.0.1:5557 OUT.jsonl SECONDS

Each line is one multipart message: {"frames": [hex, hex, hex]} (topic, 8-byte
big-endian sequence number, msgpack EventBatch), plus the decoded form for a reader.
Needs pyzmq and msgspec (both installed with vLLM).
"""
import json, sys, time
import msgspec, zmq

endpoint, out, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(endpoint)
deadline = time.time() + seconds
with open(out, "w") as fh:
    while time.time() < deadline:
        if not sub.poll(100):
            continue
        frames = sub.recv_multipart()
        decoded = msgspec.msgpack.decode(frames[-1]) if frames else None
        fh.write(json.dumps({"frames": [f.hex() for f in frames], "decoded": decoded},
                            default=lambda b: b.hex() if isinstance(b, bytes) else str(b)) + "\n")
        fh.flush()
