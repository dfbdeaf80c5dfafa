"""wasi-nn backends: the same bundles on ONNX Runtime and OpenVINO as on tract, OpenVINO IR
bundles, the fallback from tract to the native backends, the node's measured choice, and a node
without ONNX Runtime or OpenVINO.

The node loads `libonnxruntime` from the `onnxruntime` wheel in `.venv` (scripts/test installs
it for the reference outputs) and `libopenvino_c` from the `openvino` wheel: outputs must agree
with onnxruntime in Python within 1e-4 in every datatype.
"""

from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import onnx
import pytest
import requests
import tritonclient.http as httpclient
from onnx import TensorProto, helper

import gen_models
from conftest import new_publisher, pack, run_cli, start_dev, stop_dev
from test_triton_client import assert_matches, infer_inputs, make_inputs, openvino_reference, reference

MODELS = sorted(gen_models.GENERATED) + sorted(gen_models.PUBLISHED)
NATIVE = ["ort", "openvino"]
# The published squeezenet's weights are constant fills, so its 1000 logits tie; OpenVINO itself
# (in Python too) answers 0 for 8 of them where onnxruntime answers 0.001. There the node's
# OpenVINO backend must match OpenVINO in Python; `squeezenet_rw` (seeded weights) matches
# onnxruntime.
OPENVINO_DIFFERS = {("squeezenet", "openvino")}


PREFIX = {"ort": "onnxruntime", "openvino": "openvino"}


def make_det() -> onnx.ModelProto:
    """Determinants of a batch of 3x3 matrices: ONNX Runtime has `Det`, tract 0.23 does not."""
    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"], name="det")],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.fixture(scope="module")
def backends(tmp_path_factory, sophon_bin):
    work = tmp_path_factory.mktemp("sophon-backends")
    key, pub = new_publisher(sophon_bin, work)
    paths = gen_models.generate(work / "models")
    det = work / "models" / "det.onnx"
    onnx.save(make_det(), str(det))
    models, bundles = {}, {}
    for name, path in paths.items():
        for backend in NATIVE:
            models[f"{name}_{backend}"] = path
            bundles[f"{name}_{backend}"] = pack(
                sophon_bin, key, path, f"{name}_{backend}", work / f"{name}_{backend}.sbundle", "--backend", backend
            )
    # No backend named: tract first, and ONNX Runtime when tract cannot load it.
    models["det"] = det
    bundles["det"] = pack(sophon_bin, key, det, "det", work / "det.sbundle")
    n = start_dev(sophon_bin, work, pub, models, bundles)
    yield n
    stop_dev(n)


@pytest.fixture(scope="module")
def ort_client(backends):
    c = httpclient.InferenceServerClient(url=backends.url, connection_timeout=30, network_timeout=120)
    yield c
    c.close()


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("model", MODELS)
def test_native_backend_matches_onnxruntime_in_every_datatype(backends, ort_client, model, backend):
    name = f"{model}_{backend}"
    config = ort_client.get_model_config(name)
    how = config["parameters"]["sophon_graph_model"]["string_value"]
    assert how.startswith(PREFIX[backend]), how
    assert config["backend"] == PREFIX[backend] and config["instance_group"][0]["kind"] == "KIND_CPU", config
    for batch, binary in [(1, True), (3, False)]:
        feeds = make_inputs(backends, name, batch=batch, seed=batch)
        want = reference(backends, name, feeds)
        if (model, backend) in OPENVINO_DIFFERS:
            want = openvino_reference(backends.models[name], feeds)
        result = ort_client.infer(name, infer_inputs(feeds, binary))
        for output, ref in want.items():
            assert_matches(result.as_numpy(output), ref, f"{name}/{output} batch {batch}")


def test_a_graph_tract_cannot_load_runs_on_onnxruntime(backends, ort_client, sophon_bin):
    # The pack-time check found it and wrote it into the manifest (the coordinators place the
    # model only on nodes with ONNX Runtime).
    shown = run_cli(sophon_bin, "inspect", str(backends.bundles["det"]))
    assert "loads on   ort (checked at pack time)" in shown.stdout, shown.stdout
    packed = run_cli(
        sophon_bin, "pack", "--onnx", str(backends.models["det"]), "--name", "det2",
        "--key", str(backends.workdir / "publisher.key"), "-o", str(backends.workdir / "det2.sbundle"),
    )
    assert "tract cannot load it" in packed.stdout and "Det" in packed.stdout, packed.stdout
    assert "ort   loaded it and ran it" in packed.stdout, packed.stdout
    assert "warning: tract cannot load this model" in packed.stderr, packed.stderr
    how = ort_client.get_model_config("det")["parameters"]["sophon_graph_model"]["string_value"]
    assert how.startswith(("onnxruntime", "openvino")) and "not tract" in how and "Det" in how, how
    x = np.array([[[2, 0, 0], [0, 3, 0], [0, 0, 4]], [[1, 2, 3], [0, 1, 4], [5, 6, 0]]], np.float32)
    result = ort_client.infer("det", infer_inputs({"x": x}, True))
    np.testing.assert_allclose(result.as_numpy("y"), [24.0, 1.0], rtol=1e-5)
    # A bad request (wrong inner shape), then a good one on the same pooled session.
    bad = requests.post(
        f"{backends.base}/v2/models/det/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}]},
        timeout=30,
    )
    assert bad.status_code == 400, bad.text
    result = ort_client.infer("det", infer_inputs({"x": x}, False))
    np.testing.assert_allclose(result.as_numpy("y"), [24.0, 1.0], rtol=1e-5)


def test_without_native_libraries_the_node_serves_on_tract_and_says_why(tmp_path, sophon_bin):
    key, pub = new_publisher(sophon_bin, tmp_path)
    paths = gen_models.generate(tmp_path / "models")
    det = tmp_path / "det.onnx"
    onnx.save(make_det(), str(det))
    mlp = pack(sophon_bin, key, paths["gen_mlp"], "gen_mlp", tmp_path / "mlp.sbundle")
    on_ort = pack(sophon_bin, key, paths["gen_mlp"], "mlp_ort", tmp_path / "mlp_ort.sbundle", "--backend", "ort")
    nowhere = str(tmp_path / "no-such-libonnxruntime.so")
    ov_nowhere = str(tmp_path / "no-such-libopenvino_c.so")
    hidden = {"ORT_DYLIB_PATH": nowhere, "OPENVINO_DYLIB_PATH": ov_nowhere}
    env = dict(os.environ, **hidden)
    # A bundle that only ONNX Runtime can run is refused at load, with each backend's reason.
    for bundle, said in [(on_ort, "ort: absent (ORT_DYLIB_PATH"), (pack(sophon_bin, key, det, "det", tmp_path / "det.sbundle"), "Det")]:
        refused = subprocess.run(
            [sophon_bin, "dev", "--no-coordinator", "--no-examples", "--http", "127.0.0.1:0", "--trust", str(pub),
             "--bundle", str(bundle)],
            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
        )
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr
    old = {k: os.environ.get(k) for k in hidden}
    os.environ.update(hidden)
    try:
        n = start_dev(sophon_bin, tmp_path, pub, {"gen_mlp": paths["gen_mlp"]}, {"gen_mlp": mlp})
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    try:
        banner = n.stdout_path.read_text()
        assert "ort: absent (ORT_DYLIB_PATH=" in banner, banner
        assert "openvino: absent (OPENVINO_DYLIB_PATH=" in banner, banner
        c = httpclient.InferenceServerClient(url=n.url)
        how = c.get_model_config("gen_mlp")["parameters"]["sophon_graph_model"]["string_value"]
        assert how.startswith("tract"), how
        feeds = make_inputs(n, "gen_mlp", batch=2)
        want = reference(n, "gen_mlp", feeds)
        result = c.infer("gen_mlp", infer_inputs(feeds, True))
        for output, ref in want.items():
            assert_matches(result.as_numpy(output), ref, f"gen_mlp/{output} on tract")
    finally:
        stop_dev(n)


def test_without_cuda_tract_cuda_is_absent_and_says_why(tmp_path, sophon_bin, backends):
    # This machine has no NVIDIA driver: the node starts, reports tract-cuda absent with the
    # reason, and a bundle that asks for tract-cuda alone is refused at load with it.
    banner = backends.stdout_path.read_text()
    assert "tract-cuda: absent (no CUDA" in banner, banner
    key, pub = new_publisher(sophon_bin, tmp_path)
    mlp = gen_models.generate(tmp_path / "models")["gen_mlp"]
    on_cuda = pack(sophon_bin, key, mlp, "mlp_cuda", tmp_path / "mlp_cuda.sbundle", "--backend", "tract-cuda")
    refused = subprocess.run(
        [sophon_bin, "dev", "--no-coordinator", "--no-examples", "--http", "127.0.0.1:0", "--trust", str(pub),
         "--bundle", str(on_cuda)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert refused.returncode != 0 and "tract-cuda: absent (no CUDA" in refused.stderr, refused.stderr


def test_openvino_ir_bundle_matches_onnxruntime(tmp_path, sophon_bin):
    # OpenVINO's own format: the model converted to IR (XML and weights) by OpenVINO in Python,
    # packed with `sophon pack --openvino`, served by the openvino backend.
    import openvino as ov

    key, pub = new_publisher(sophon_bin, tmp_path)
    paths = gen_models.generate(tmp_path / "models")
    xml = tmp_path / "mlp.xml"
    # Weights kept in f32 (save_model halves them to f16 by default).
    ov.save_model(ov.convert_model(str(paths["gen_mlp"])), str(xml), compress_to_fp16=False)
    bundle = tmp_path / "mlp_ir.sbundle"
    run_cli(sophon_bin, "pack", "--openvino", str(xml), "--name", "mlp_ir", "-o", str(bundle), "--key", str(key))
    shown = run_cli(sophon_bin, "inspect", str(bundle))
    assert "openvino" in shown.stdout and "model.bin" in shown.stdout, shown.stdout
    n = start_dev(sophon_bin, tmp_path, pub, {"mlp_ir": paths["gen_mlp"]}, {"mlp_ir": bundle})
    try:
        c = httpclient.InferenceServerClient(url=n.url)
        config = c.get_model_config("mlp_ir")
        assert config["backend"] == "openvino", config
        for batch in [1, 4]:
            feeds = make_inputs(n, "mlp_ir", batch=batch, seed=batch)
            want = reference(n, "mlp_ir", feeds)
            result = c.infer("mlp_ir", infer_inputs(feeds, True))
            for output, ref in want.items():
                assert_matches(result.as_numpy(output), ref, f"mlp_ir/{output} batch {batch}")
    finally:
        stop_dev(n)
    # IR is OpenVINO's alone: a node without it refuses the bundle at load, saying why.
    refused = subprocess.run(
        [sophon_bin, "dev", "--no-coordinator", "--no-examples", "--http", "127.0.0.1:0", "--trust", str(pub),
         "--bundle", str(bundle)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env=dict(os.environ, OPENVINO_DYLIB_PATH=str(tmp_path / "nowhere.so")),
    )
    assert refused.returncode != 0 and "openvino: absent (OPENVINO_DYLIB_PATH=" in refused.stderr, refused.stderr


def test_the_node_measures_the_backends_and_keeps_the_choice(tmp_path, sophon_bin):
    # No backend named: every CPU backend loads the graph, each runs it on zeros shaped by the
    # manifest, the fastest serves it, and a restart reuses the measurement.
    key, pub = new_publisher(sophon_bin, tmp_path)
    paths = gen_models.generate(tmp_path / "models")
    bundle = pack(sophon_bin, key, paths["gen_mlp"], "gen_mlp", tmp_path / "mlp.sbundle")
    hows = []
    for _ in range(2):
        n = start_dev(sophon_bin, tmp_path, pub, {"gen_mlp": paths["gen_mlp"]}, {"gen_mlp": bundle})
        try:
            c = httpclient.InferenceServerClient(url=n.url)
            hows.append(c.get_model_config("gen_mlp")["parameters"]["sophon_graph_model"]["string_value"])
            feeds = make_inputs(n, "gen_mlp", batch=2)
            want = reference(n, "gen_mlp", feeds)
            result = c.infer("gen_mlp", infer_inputs(feeds, True))
            for output, ref in want.items():
                assert_matches(result.as_numpy(output), ref, f"gen_mlp/{output}")
        finally:
            stop_dev(n)
    first, second = hows
    if "as measured at an earlier load" not in first:  # a shared SOPHON_E2E_CACHE_DIR may hold it
        assert "the fastest here on a synthetic input (" in first, first
        for backend in ["tract", "ort", "openvino"]:
            assert f"{backend} " in first.split("synthetic input (")[1], first
    assert "as measured at an earlier load" in second, second
    assert second.split(";")[0] == first.split(";")[0], (first, second)


def test_a_graph_no_backend_runs_is_refused_with_each_reason(tmp_path, sophon_bin):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")],
        "alien",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)], ir_version=8
    )
    path = tmp_path / "alien.onnx"
    onnx.save(model, str(path))
    key, pub = new_publisher(sophon_bin, tmp_path)
    packed = run_cli(sophon_bin, "pack", "--onnx", str(path), "--name", "alien", "-o", str(tmp_path / "a.sbundle"),
                     "--key", str(key))
    assert "warning: no backend here loads this model" in packed.stderr, packed.stderr
    refused = subprocess.run(
        [sophon_bin, "dev", "--no-coordinator", "--no-examples", "--http", "127.0.0.1:0", "--trust", str(pub),
         "--bundle", str(tmp_path / "a.sbundle")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert refused.returncode != 0, refused.stderr
    for backend in ["tract:", "ort:", "openvino:", "tract-cuda: absent"]:
        assert backend in refused.stderr, (backend, refused.stderr)
    assert "NoSuchOp" in refused.stderr, refused.stderr


def test_the_inventory_is_printed_and_on_metrics(backends, ort_client):
    # What the node has, at start: CPU, GPUs (none here, and why), OpenVINO's devices, ONNX
    # Runtime's execution providers, and each backend.
    banner = backends.stdout_path.read_text()
    for said in ["CPU: ", "GPUs: none (no NVIDIA driver", "OpenVINO devices: CPU",
                 "ONNX Runtime execution providers: CPUExecutionProvider", "Backends: tract: tract 0.23 (CPU)"]:
        assert said in banner, (said, banner)
    metrics = requests.get(f"{backends.base}/metrics", timeout=30).text
    for line in ['sophon_node_backend_present{backend="openvino"} 1', 'sophon_node_backend_present{backend="ort"} 1',
                 'sophon_node_backend_present{backend="tract-cuda"} 0', "sophon_node_cpu_cores "]:
        assert line in metrics, (line, metrics[:2000])
    # Each model's metrics say which device it runs on.
    ort_client.infer("gen_mlp_openvino", infer_inputs(make_inputs(backends, "gen_mlp_openvino", batch=1), True))
    metrics = requests.get(f"{backends.base}/metrics", timeout=30).text
    assert re.search(r'sophon_inference_requests_total\{device="cpu",model="gen_mlp_openvino",[^}]*\} [1-9]', metrics), \
        metrics[:3000]


def test_threads_per_request_reach_the_native_backends(tmp_path, sophon_bin):
    # `pack --threads 2`: ONNX Runtime's sessions and OpenVINO's streams compute each request on
    # two threads, and say so; a manifest asking for more than 256 is refused at pack time.
    key, pub = new_publisher(sophon_bin, tmp_path)
    paths = gen_models.generate(tmp_path / "models")
    models, bundles = {}, {}
    for backend in NATIVE:
        name = f"mlp_{backend}_t2"
        models[name] = paths["gen_mlp"]
        bundles[name] = pack(
            sophon_bin, key, paths["gen_mlp"], name, tmp_path / f"{name}.sbundle", "--backend", backend, "--threads", "2"
        )
    shown = run_cli(sophon_bin, "inspect", str(bundles["mlp_ort_t2"]))
    assert "2 thread(s) per request" in shown.stdout, shown.stdout
    refused = subprocess.run(
        [sophon_bin, "pack", "--onnx", str(paths["gen_mlp"]), "--name", "x", "--threads", "1000", "--key", str(key),
         "-o", str(tmp_path / "x.sbundle")],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert refused.returncode != 0 and "resources.threads = 1000" in refused.stderr, refused.stderr
    n = start_dev(sophon_bin, tmp_path, pub, models, bundles)
    try:
        c = httpclient.InferenceServerClient(url=n.url)
        for name, said in [("mlp_ort_t2", "2 intra-op thread(s) per request"), ("mlp_openvino_t2", "2 thread(s) per request")]:
            how = c.get_model_config(name)["parameters"]["sophon_graph_model"]["string_value"]
            assert said in how, how
            feeds = make_inputs(n, name, batch=3)
            want = reference(n, name, feeds)
            result = c.infer(name, infer_inputs(feeds, True))
            for output, ref in want.items():
                assert_matches(result.as_numpy(output), ref, f"{name}/{output}")
    finally:
        stop_dev(n)
