#!/usr/bin/env python3
"""What a compressed gRPC request costs the node, on servers side by side: the same
`ModelInfer` sent plain and with `compression_algorithm="gzip"` (tritonclient's grpc client, one
channel per server), rounds alternating servers and ways. For each it prints the median latency
(which includes the client's own compression, the same for every server) and the server's CPU
time per request (each thread's run time from /proc/PID/task/*/schedstat, in nanoseconds; a thread that ends
during a round is left out).

Usage: .venv/bin/python scripts/bench-grpc-compression.py HOST:GRPC_PORT@PID[,...] [ROUNDS] [PER_ROUND]
against `sophon dev --no-coordinator` (the built-in `mlp`) on each port (see docs/BENCHMARKS.md).
"""

import os
import statistics
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient


def cpu_ns(pid):
    """Each thread's CPU time so far, by thread id (from its schedstat, in nanoseconds)."""
    times = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                times[task] = int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return times


def spent(before, after):
    """CPU time spent between two readings: threads that ended meanwhile are left out (their
    last moments uncounted) rather than subtracted."""
    return sum(t - before.get(task, 0) for task, t in after.items())


def main():
    servers, pids = zip(*(s.split("@") for s in sys.argv[1].split(",")))
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    per_round = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    # 64 rows of the MLP, values with two decimals: 200 KB raw, about 3:1 in gzip.
    rows = np.random.default_rng(0).random((64, 784), dtype=np.float32).round(2)
    x = grpcclient.InferInput("input", [64, 784], "FP32")
    x.set_data_from_numpy(rows)
    clients = [grpcclient.InferenceServerClient(s) for s in servers]
    ways = [("plain", None), ("gzip", "gzip")]
    times = {(s, w): [] for s in servers for w, _ in ways}
    cpu = {(s, w): 0 for s in servers for w, _ in ways}
    for _ in range(rounds):
        for server, pid, client in zip(servers, pids, clients):
            for way, algorithm in ways:
                for _ in range(3):  # warm
                    client.infer("mlp", [x], compression_algorithm=algorithm)
                before = cpu_ns(pid)
                for _ in range(per_round):
                    start = time.perf_counter()
                    client.infer("mlp", [x], compression_algorithm=algorithm)
                    times[(server, way)].append(time.perf_counter() - start)
                cpu[(server, way)] += spent(before, cpu_ns(pid))
    for server in servers:
        plain = statistics.median(times[(server, "plain")]) * 1e3
        packed = statistics.median(times[(server, "gzip")]) * 1e3
        n = rounds * per_round
        cpu_plain = cpu[(server, "plain")] / n / 1e3
        cpu_packed = cpu[(server, "gzip")] / n / 1e3
        print(
            f"{server}: plain p50 {plain:.2f} ms, server CPU {cpu_plain:.0f} us; "
            f"gzip p50 {packed:.2f} ms (+{packed - plain:.2f} ms), server CPU {cpu_packed:.0f} us "
            f"(+{cpu_packed - cpu_plain:.0f} us)"
        )


if __name__ == "__main__":
    main()
