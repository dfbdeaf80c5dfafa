"""Dynamic batching, as a Triton user meets it.

- `sophon pack --onnx` finds the batch dimension the way Triton's auto-complete does, so
  `/config` reports `max_batch_size` and perf_analyzer needs no `--shape`.
- `--max-queue-delay-us` turns dynamic batching on in the manifest; `sophon dev
  --dynamic-batching MODEL=US` turns it on (or off) on the node.
- Requests sent at once are answered as onnxruntime answers each alone (every datatype of
  `gen_types`), in fewer executions than requests, and a bad request among them fails alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import subprocess

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import gen_models
from conftest import new_publisher, pack, run_cli, start_dev, stop_dev
from test_perf_analyzer import _cudart_dir, _perf_analyzer
from test_triton_client import assert_matches, infer_inputs, make_inputs, reference


@pytest.fixture(scope="module")
def batching(tmp_path_factory, sophon_bin):
    work = tmp_path_factory.mktemp("sophon-batching")
    key, pub = new_publisher(sophon_bin, work)
    paths = gen_models.generate(work / "models")
    bundles = {
        # Batching from the manifest: requests wait up to 20 ms for others.
        "mlp_b": pack(sophon_bin, key, paths["gen_mlp"], "mlp_b", work / "mlp_b.sbundle",
                      "--max-queue-delay-us", "20000"),
        # The concurrency test's: a batch forms when its 16 rows have arrived (the preferred
        # size), or after half a second, so a slow machine still batches them.
        "mlp_16": pack(sophon_bin, key, paths["gen_mlp"], "mlp_16", work / "mlp_16.sbundle",
                       "--max-queue-delay-us", "500000", "--preferred-batch-size", "16"),
        # Batching from the node's flag (below): at most 16 rows, so it cuts at 16 too.
        "types_b": pack(sophon_bin, key, paths["gen_types"], "types_b", work / "types_b.sbundle"),
        # Batching in the manifest, turned off by the node.
        "mlp_off": pack(sophon_bin, key, paths["gen_mlp"], "mlp_off", work / "mlp_off.sbundle",
                        "--max-queue-delay-us", "100"),
    }
    models = {"mlp_b": paths["gen_mlp"], "mlp_16": paths["gen_mlp"], "types_b": paths["gen_types"],
              "mlp_off": paths["gen_mlp"]}
    n = start_dev(sophon_bin, work, pub, models, bundles,
                  "--dynamic-batching", "types_b=500000/16", "--dynamic-batching", "mlp_off=off",
                  "--concurrency", "1")
    yield n
    stop_dev(n)


def test_pack_detects_the_batch_dimension(tmp_path, sophon_bin):
    key, _ = new_publisher(sophon_bin, tmp_path)
    mlp = gen_models.generate(tmp_path / "models")["gen_mlp"]
    detected = pack(sophon_bin, key, mlp, "m", tmp_path / "m.sbundle")
    out = run_cli(sophon_bin, "inspect", str(detected)).stdout
    assert "batch      dim 0, at most 1024 rows" in out, out
    assert "batching" not in out.replace("batch      dim 0", ""), out
    # A pinned batch dimension is no batch; asking for one on such a model is refused.
    pinned = pack(sophon_bin, key, mlp, "m", tmp_path / "p.sbundle", "--shape", "x:1,-1")
    assert "batch " not in run_cli(sophon_bin, "inspect", str(pinned)).stdout
    refused = subprocess.run(
        [sophon_bin, "pack", "--onnx", str(mlp), "--name", "m", "--key", str(key), "-o", str(tmp_path / "r.sbundle"),
         "--shape", "x:1,-1", "--max-batch-size", "8"],
        capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "leading" not in refused.stdout, refused
    assert "variable (batch)" in refused.stderr, refused.stderr
    delayed = pack(sophon_bin, key, mlp, "m", tmp_path / "d.sbundle", "--max-queue-delay-us", "500",
                   "--preferred-batch-size", "4", "--preferred-batch-size", "8")
    out = run_cli(sophon_bin, "inspect", str(delayed)).stdout
    assert "batching   dynamic, up to 64 rows, waiting at most 500 µs, preferring [4, 8]" in out, out


def test_config_reports_dynamic_batching(batching):
    c = httpclient.InferenceServerClient(url=batching.url)
    g = grpcclient.InferenceServerClient(url=batching.grpc_url)
    try:
        config = c.get_model_config("mlp_b")
        assert config["max_batch_size"] == 1024
        assert config["parameters"]["sophon_batch_limit"]["string_value"] == "64"
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
        # Triton's dims leave the batch dimension out.
        assert all(-1 not in i["dims"][:1] or len(i["dims"]) > 1 for i in config["input"]), config
        types = c.get_model_config("types_b")
        assert types["dynamic_batching"]["max_queue_delay_microseconds"] == 500000
        assert types["parameters"]["sophon_batch_limit"]["string_value"] == "16"
        preferred = c.get_model_config("mlp_16")["dynamic_batching"]["preferred_batch_size"]
        assert preferred == [16], preferred
        assert "dynamic_batching" not in c.get_model_config("mlp_off")
        grpc_config = g.get_model_config("mlp_b", as_json=True)["config"]
        assert grpc_config["dynamic_batching"]["max_queue_delay_microseconds"] == "20000", grpc_config
    finally:
        c.close()
        g.close()


def _counts(n, model):
    stats = requests.get(f"{n.base}/v2/models/{model}/stats", timeout=10).json()["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


@pytest.mark.parametrize("model", ["mlp_16", "types_b"])
def test_concurrent_requests_batch_and_match_onnxruntime(batching, model):
    before = _counts(batching, model)
    sizes = [1, 3, 2, 1, 4, 1, 2, 2]
    feeds = [make_inputs(batching, model, batch=b, seed=i) for i, b in enumerate(sizes)]

    def one(f):
        c = httpclient.InferenceServerClient(url=batching.url, network_timeout=60)
        try:
            return c.infer(model, infer_inputs(f, binary=True))
        finally:
            c.close()

    with cf.ThreadPoolExecutor(len(sizes)) as pool:
        results = list(pool.map(one, feeds))
    for i, (f, result) in enumerate(zip(feeds, results)):
        for name, ref in reference(batching, model, f).items():
            assert_matches(result.as_numpy(name), ref, f"{model} request {i} ({sizes[i]} rows) {name}")
    inferences, executions = (a - b for a, b in zip(_counts(batching, model), before))
    assert inferences == sum(sizes)
    assert executions < len(sizes), f"{len(sizes)} requests at once ran in {executions} executions"


def test_a_bad_request_fails_alone(batching):
    good = [make_inputs(batching, "mlp_b", batch=2, seed=s) for s in range(5)]

    def one(i):
        c = httpclient.InferenceServerClient(url=batching.url, network_timeout=60)
        try:
            if i == 2:
                # The wrong width: refused before it can join a batch.
                bad = {k: np.zeros((2, 5), dtype=v.dtype) for k, v in good[0].items()}
                with pytest.raises(Exception) as e:
                    c.infer("mlp_b", infer_inputs(bad, binary=True))
                return e.value
            return c.infer("mlp_b", infer_inputs(good[i], binary=True))
        finally:
            c.close()

    with cf.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    assert "expected" in str(results[2]) or "shape" in str(results[2]), results[2]
    for i in (0, 1, 3, 4):
        for name, ref in reference(batching, "mlp_b", good[i]).items():
            assert_matches(results[i].as_numpy(name), ref, f"request {i} {name}")


def test_perf_analyzer_needs_no_shape(batching):
    binary = _perf_analyzer()
    if not binary.exists():
        pytest.fail(f"{binary} is missing: reinstall tests/e2e/requirements.txt")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = _cudart_dir() + ":" + env.get("LD_LIBRARY_PATH", "")
    cmd = [str(binary), "-m", "mlp_b", "-u", batching.url, "--measurement-interval", "500",
           "--stability-percentage", "50", "--max-trials", "20", "--concurrency-range", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"perf_analyzer failed:\n{out}\n{batching.logs()}"
    inferences = int(re.search(r"Inference count: (\d+)", out).group(1))
    executions = int(re.search(r"Execution count: (\d+)", out).group(1))
    assert 0 < executions < inferences, out
