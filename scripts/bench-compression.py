#!/usr/bin/env python3
"""What compressed bodies cost the node: the same request sent plain, with its body in gzip
(compressed once, ahead, so that the client's own compression is not timed), and plain with its
answer asked for in gzip (read as it comes, not inflated). Rounds alternate the three ways, and
each way's median latency is printed beside the bytes it sent and received.

Usage: .venv/bin/python scripts/bench-compression.py HOST:PORT [ROUNDS] [PER_ROUND]
against `sophon dev` serving the built-in `mlp` and SqueezeNet as `sq` (see docs/BENCHMARKS.md).
"""

import gzip
import http.client
import json
import statistics
import sys
import time

import numpy as np


def bodies():
    rng = np.random.default_rng(0)
    # The MLP in JSON, 64 rows: text compresses about 4:1.
    rows = rng.random((64, 784), dtype=np.float32).round(4)
    mlp = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [64, 784], "data": rows.ravel().tolist()}]}
    ).encode()
    # SqueezeNet in binary: an image with smooth regions, as a photo has.
    y, x = np.mgrid[0:224, 0:224].astype(np.float32)
    image = np.stack([np.sin(x / 17), np.cos(y / 23), np.sin((x + y) / 31)])[None].astype(np.float32)
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "data_0",
                    "datatype": "FP32",
                    "shape": [1, 3, 224, 224],
                    "parameters": {"binary_data_size": image.nbytes},
                }
            ],
            "outputs": [{"name": "softmaxout_1", "parameters": {"binary_data": True}}],
        }
    ).encode()
    sq = header + image.tobytes()
    return [
        ("mlp", "JSON, 64 rows", mlp, {"Content-Type": "application/json"}),
        (
            "sq",
            "binary, 1 image",
            sq,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
        ),
    ]


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    per_round = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    conn = http.client.HTTPConnection(host, int(port))

    def once(model, body, headers):
        start = time.perf_counter()
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        took = time.perf_counter() - start
        assert resp.status == 200, (resp.status, data[:200])
        return took, len(data), resp.getheader("Content-Encoding")

    for model, what, body, headers in bodies():
        packed = gzip.compress(body, compresslevel=6)
        ways = [
            ("plain", body, headers),
            ("gzip request", packed, {**headers, "Content-Encoding": "gzip"}),
            ("gzip answer", body, {**headers, "Accept-Encoding": "gzip"}),
        ]
        times = {name: [] for name, _, _ in ways}
        sizes = {}
        for _ in range(3):  # warm up
            for _, b, h in ways:
                once(model, b, h)
        for r in range(rounds):
            order = ways[r % 3 :] + ways[: r % 3]
            for name, b, h in order:
                for _ in range(per_round):
                    took, got, coding = once(model, b, h)
                    times[name].append(took)
                sizes[name] = (len(b), got, coding)
        print(f"{model} ({what}):")
        base = statistics.median(times["plain"])
        for name, _, _ in ways:
            med = statistics.median(times[name])
            sent, got, coding = sizes[name]
            print(
                f"  {name:13s} p50 {med * 1e3:7.3f} ms  ({med / base:4.2f}x plain, {(med - base) * 1e3:+.3f} ms)"
                f"  sent {sent:>9,} B  received {got:>9,} B{' ' + coding if coding else ''}"
            )


if __name__ == "__main__":
    main()
