#!/usr/bin/env python3
"""What the classification extension costs a request: the same binary request asking for its
output raw and as its top 5 classes, alternating in rounds of 100 on one kept-alive connection.

Usage: .venv/bin/python scripts/bench-classification.py HOST:PORT MODEL INPUT OUTPUT DIMS [ROUNDS]
(DIMS like 1,784), against `sophon dev` (see docs/BENCHMARKS.md).
"""
import json, statistics, sys, time, http.client
import numpy as np
host, port = sys.argv[1].rsplit(":", 1)
model, inp, out, shape = sys.argv[2], sys.argv[3], sys.argv[4], [int(d) for d in sys.argv[5].split(",")]
conn = http.client.HTTPConnection(host, int(port))
x = np.random.default_rng(0).random(shape, dtype=np.float32)
def body(outputs):
    h = json.dumps({"inputs": [{"name": inp, "datatype": "FP32", "shape": shape,
        "parameters": {"binary_data_size": x.nbytes}}], "outputs": outputs}).encode()
    return h + x.tobytes(), {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}
ways = [("raw output", body([{"name": out, "parameters": {"binary_data": True}}])),
        ("top 5 classes", body([{"name": out, "parameters": {"binary_data": True, "classification": 5}}]))]
times = {n: [] for n, _ in ways}
for r in range(int(sys.argv[6]) if len(sys.argv) > 6 else 6):
    for n, (b, h) in (ways if r % 2 == 0 else ways[::-1]):
        for _ in range(100):
            t = time.perf_counter(); conn.request("POST", f"/v2/models/{model}/infer", b, h)
            resp = conn.getresponse(); d = resp.read(); times[n].append(time.perf_counter() - t)
            assert resp.status == 200, d[:200]
base = statistics.median(times["raw output"])
for n, _ in ways:
    m = statistics.median(times[n]); print(f"{model}: {n:14s} p50 {m*1e6:8.1f} us ({m/base:.3f}x, {(m-base)*1e6:+.1f} us)")
