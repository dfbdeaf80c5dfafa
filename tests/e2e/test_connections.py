"""One client cannot hold every connection: past `--max-connections-per-client`, Triton's own
clients (HTTP and gRPC) get the reason, other clients are served meanwhile, and the client is
served again once it closes what it held."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import START_TIMEOUT_S, _free_port

SAYS = "too many connections from 127.0.0.1: each client may hold 2 at once"


def get_from(source: str, port: int, path: str) -> bytes:
    """GET `path` on a connection from the local address `source` (any of 127.0.0.0/8)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    return got


def mlp_inputs(module):
    x = module.InferInput("input", [1, 784], "FP32")
    x.set_data_from_numpy(np.linspace(0, 1, 784, dtype=np.float32)[None])
    return [x]


def test_one_client_holds_at_most_its_share_of_connections(sophon_bin, tmp_path):
    http, grpc = _free_port(), _free_port()
    cmd = [sophon_bin, "dev", "--no-coordinator", "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc}",
           "--admin", f"127.0.0.1:{_free_port()}", "--mesh", f"127.0.0.1:{_free_port()}",
           "--node-mesh", f"127.0.0.1:{_free_port()}", "--max-connections", "64", "--max-connections-per-client", "2"]
    env = dict(os.environ, HOME=str(tmp_path), SOPHON_HOME=str(tmp_path / "sophon"))
    with open(tmp_path / "dev.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, (tmp_path / "dev.log").read_text()
            try:
                if requests.get(f"http://127.0.0.1:{http}/v2/models/mlp/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "dev.log").read_text()
            time.sleep(0.25)
        want = httpclient.InferenceServerClient(f"127.0.0.1:{http}").infer("mlp", mlp_inputs(httpclient)).as_numpy("output")
        time.sleep(0.3)  # that client's connection closes

        # One client holds its two connections, idle.
        held = [socket.create_connection(("127.0.0.1", http)) for _ in range(2)]
        time.sleep(0.3)
        for _ in range(2):
            with pytest.raises(InferenceServerException) as refused:
                httpclient.InferenceServerClient(f"127.0.0.1:{http}").infer("mlp", mlp_inputs(httpclient))
            assert refused.value.status() == "503" and SAYS in refused.value.message(), refused.value
            with pytest.raises(InferenceServerException) as refused:
                grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").infer("mlp", mlp_inputs(grpcclient), client_timeout=10)
            assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value
            assert SAYS in refused.value.message(), refused.value
        # Another client (another loopback address) is served meanwhile, and sees the refusals
        # counted.
        metrics = get_from("127.0.0.2", http, "/metrics").decode()
        assert metrics.startswith("HTTP/1.1 200"), metrics[:300]
        refused = [line for line in metrics.splitlines() if line.startswith("sophon_connections_refused_total ")]
        assert refused and int(refused[0].split()[1]) >= 4, refused

        # Once the client lets go, it is served again, over both protocols, with the same answer.
        for s in held:
            s.close()
        time.sleep(0.3)
        got = httpclient.InferenceServerClient(f"127.0.0.1:{http}").infer("mlp", mlp_inputs(httpclient)).as_numpy("output")
        np.testing.assert_array_equal(got, want)
        got = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").infer("mlp", mlp_inputs(grpcclient)).as_numpy("output")
        np.testing.assert_array_equal(got, want)
    finally:
        proc.terminate()
        proc.wait(10)
