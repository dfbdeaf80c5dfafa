"""Triton's own load generator, perf_analyzer, drives the node unchanged.

perf_analyzer ships in the tritonclient 2.49.0 wheel (`.venv/bin/perf_analyzer`). It needs
libb64 (Debian `libb64-0d`, which `scripts/test` installs) and libcudart (the
`nvidia-cuda-runtime-cu12` wheel; no GPU is used). It refuses to run unless the model
configuration and statistics extensions answer as Triton's do, and it checks every response.
"""

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _perf_analyzer() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def _cudart_dir() -> str:
    import nvidia.cuda_runtime  # the nvidia-cuda-runtime-cu12 wheel

    return str(Path(nvidia.cuda_runtime.__path__[0]) / "lib")


@pytest.mark.parametrize(
    "protocol_args",
    [[], ["--input-data", "zero"], ["-i", "grpc"], ["-i", "grpc", "--streaming"]],
    ids=["random", "zero", "grpc", "grpc-stream"],
)
def test_perf_analyzer_measures_the_mlp(node, protocol_args):
    binary = _perf_analyzer()
    if not binary.exists():
        pytest.fail(f"{binary} is missing: tritonclient 2.49.0 ships it; reinstall tests/e2e/requirements.txt")
    if ctypes.util.find_library("b64") is None and not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        pytest.skip("libb64.so.0d is not installed (apt-get install libb64-0d; scripts/test does this)")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = _cudart_dir() + ":" + env.get("LD_LIBRARY_PATH", "")
    cmd = [
        str(binary),
        "-m", "mlp",
        "-u", node.grpc_url if "grpc" in protocol_args else node.url,
        "--measurement-interval", "500",
        # This checks that Triton's own load generator drives the node, not that a shared 2-core
        # VM is quiet: accept windows within 50% of each other, and try longer before giving up.
        "--stability-percentage", "50",
        "--max-trials", "20",
        "--concurrency-range", "1:2",
        *protocol_args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"perf_analyzer failed:\n{out}\n{node.logs()}"
    rates = [float(x) for x in re.findall(r"Throughput: ([0-9.]+) infer/sec", out)]
    assert len(rates) == 2 and all(r > 0 for r in rates), out
    # Its server-side section comes from our statistics extension.
    assert re.search(r"Successful request count: [1-9]", out), out
