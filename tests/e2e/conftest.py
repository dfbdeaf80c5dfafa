"""Session fixtures: build the bundles, start one `sophon dev` node, stop it gracefully at the end.

Environment:
- SOPHON_BIN (required): path of the `sophon` binary under test.
- SOPHON_E2E_START_TIMEOUT: seconds to wait for /v2/health/ready (default 60).
- SOPHON_E2E_CACHE_DIR: AOT component cache to reuse between runs (default: a fresh temp dir).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_models  # noqa: E402

START_TIMEOUT_S = float(os.environ.get("SOPHON_E2E_START_TIMEOUT", "60"))
STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass
class Node:
    url: str  # host:port, as tritonclient wants it
    base: str  # http://host:port
    workdir: Path
    models: dict  # name -> path of the ONNX file the bundle was packed from
    bundles: dict  # name -> path of the .sbundle
    bin: str
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    grpc_url: str = ""  # host:port of the gRPC API
    admin_base: str = ""  # http://host:port of the coordinator's admin API

    def logs(self) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- sophon dev stdout ---\n{out[-6000:]}\n--- sophon dev stderr ---\n{err[-12000:]}"


def _sophon_bin() -> str:
    path = os.environ.get("SOPHON_BIN")
    if not path:
        pytest.fail(
            "SOPHON_BIN is not set: build the binary (cargo build --bin sophon) and run e.g.\n"
            "  SOPHON_BIN=target/debug/sophon .venv/bin/python -m pytest tests/e2e",
            pytrace=False,
        )
    path = os.path.abspath(path)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"SOPHON_BIN={path} is not an executable file", pytrace=False)
    return path


def run_cli(bin_path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [bin_path, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        pytest.fail(
            f"`sophon {' '.join(args)}` exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sophon_bin() -> str:
    return _sophon_bin()


def new_publisher(sophon_bin: str, work: Path) -> tuple[Path, Path]:
    """A signing key and its public key file, made with `sophon keygen`."""
    key = work / "publisher.key"
    run_cli(sophon_bin, "keygen", "-o", str(key))
    pub = work / "publisher.pub"
    assert key.is_file() and pub.is_file(), f"keygen did not write {key} and {pub}"
    return key, pub


# The seeded SqueezeNet's class names: this and the class's index.
SQUEEZENET_LABEL = "class #"


def pack(sophon_bin: str, key: Path, onnx_path: Path, name: str, out: Path, *extra: str) -> Path:
    run_cli(sophon_bin, "pack", "--onnx", str(onnx_path), "--name", name, "-o", str(out), "--key", str(key), *extra)
    assert out.is_file(), f"pack did not write {out}"
    return out


def start_dev(sophon_bin: str, work: Path, pub: Path, models: dict, bundles: dict, *extra: str) -> Node:
    """`sophon dev` (its coordinator and node, joined through the mesh) on free ports and a
    fresh data directory, serving `bundles`; waits until it is ready."""
    cache = os.environ.get("SOPHON_E2E_CACHE_DIR") or str(work / "cache")
    port = _free_port()
    admin_port, mesh_port, node_mesh_port, grpc_port = _free_port(), _free_port(), _free_port(), _free_port()
    cmd = [sophon_bin, "dev", "--http", f"127.0.0.1:{port}", "--grpc", f"127.0.0.1:{grpc_port}",
           "--trust", str(pub), "--cache-dir", cache,
           "--data", str(work / "coordinator"), "--admin", f"127.0.0.1:{admin_port}",
           "--mesh", f"127.0.0.1:{mesh_port}", "--node-mesh", f"127.0.0.1:{node_mesh_port}"]
    for b in bundles.values():
        cmd += ["--bundle", str(b)]
    cmd += list(extra)
    stdout_path, stderr_path = work / "dev.stdout", work / "dev.stderr"
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    with open(stdout_path, "wb") as out_f, open(stderr_path, "wb") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, env=env)
    n = Node(
        url=f"127.0.0.1:{port}",
        base=f"http://127.0.0.1:{port}",
        workdir=work,
        models=models,
        bundles=bundles,
        bin=sophon_bin,
        proc=proc,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
        grpc_url=f"127.0.0.1:{grpc_port}",
        admin_base=f"http://127.0.0.1:{admin_port}",
    )

    deadline = time.monotonic() + START_TIMEOUT_S
    ready = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = requests.get(f"{n.base}/v2/health/ready", timeout=2)
            if r.status_code == 200 and r.json().get("ready") is True:
                ready = True
                break
        except (requests.ConnectionError, requests.Timeout, ValueError):
            pass
        time.sleep(0.25)
    if not ready:
        rc = proc.poll()
        if rc is None:
            proc.kill()
            proc.wait(5)
            why = f"not ready after {START_TIMEOUT_S:.0f} s"
        else:
            why = f"exited {rc} before becoming ready"
        pytest.fail(f"sophon dev {why}\ncommand: {' '.join(cmd)}\n{n.logs()}", pytrace=False)

    banner = stdout_path.read_text(errors="replace")
    assert f"Sophon dev node serving KServe V2 on http://127.0.0.1:{port}" in banner, n.logs()
    return n


def stop_dev(n: Node) -> None:
    """Graceful shutdown: SIGTERM must stop the node with exit status 0 within a few seconds."""
    proc = n.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            pytest.fail(f"sophon dev did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM\n{n.logs()}", pytrace=False)
        if rc != 0:
            pytest.fail(f"sophon dev exited {rc} on SIGTERM (expected 0)\n{n.logs()}", pytrace=False)
    else:
        pytest.fail(f"sophon dev died during the tests with status {proc.returncode}\n{n.logs()}", pytrace=False)


@pytest.fixture(scope="session")
def node(tmp_path_factory, sophon_bin) -> Node:
    work = tmp_path_factory.mktemp("sophon-e2e")
    key, pub = new_publisher(sophon_bin, work)
    models = gen_models.generate(work / "models")
    # The seeded SqueezeNet names its 1,000 classes, for the classification extension.
    labels = work / "squeezenet_labels.txt"
    labels.write_text("".join(f"{SQUEEZENET_LABEL}{i}\n" for i in range(1000)))
    extra = {"squeezenet_rw": ("--labels", f"softmaxout_1={labels}")}
    bundles = {
        name: pack(sophon_bin, key, path, name, work / f"{name}.sbundle", *extra.get(name, ()))
        for name, path in models.items()
    }
    n = start_dev(sophon_bin, work, pub, models, bundles)
    yield n
    stop_dev(n)


@pytest.fixture(scope="session")
def client(node):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url=node.url, connection_timeout=30, network_timeout=120)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def _node_still_running(request):
    """After each test that used the node, fail loudly (with its logs) if it crashed."""
    yield
    if "node" in request.fixturenames:
        n = request.getfixturevalue("node")
        if n.proc.poll() is not None:
            pytest.fail(f"sophon dev exited with status {n.proc.returncode} during this test\n{n.logs()}", pytrace=False)
