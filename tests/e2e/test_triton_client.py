"""End to end: the real `tritonclient[http]` against a running `sophon dev`, checked against onnxruntime."""

from __future__ import annotations

import gzip
import json
import re
import threading
import zlib
from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from conftest import SQUEEZENET_LABEL, run_cli

# Models packed from ONNX files by the suite (see gen_models.py).
GENERATED = ["gen_mlp", "gen_multi", "gen_types", "gen_fp16", "squeezenet_rw"]
PUBLISHED = ["squeezenet", "sigmoid"]
ONNX_MODELS = GENERATED + PUBLISHED

ONNX_TO_V2 = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.BOOL: "BOOL",
}

ATOL = 1e-4
RTOL = 1e-4


# --- onnxruntime reference side ---------------------------------------------------------------


@lru_cache(maxsize=None)
def _session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


# The published squeezenet's weights are constant fills, so its 1000 logits tie; OpenVINO (in
# Python too) answers 0 for some where onnxruntime answers 0.001. Where the node's measured choice
# runs it on OpenVINO (a loaded machine can tip the timing that way), the reference is OpenVINO's.
TIED_LOGITS = {"squeezenet"}


def openvino_reference(path, feeds: dict) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feeds)
    return {out.get_any_name(): result[out] for out in compiled.outputs}


def _runs_on_openvino(node, model: str) -> bool:
    config = requests.get(f"{node.base}/v2/models/{model}/config", timeout=10).json()
    how = config.get("parameters", {}).get("sophon_graph_model", {}).get("string_value", "")
    return how.startswith("openvino")


def reference(node, model: str, feeds: dict) -> dict:
    if model in TIED_LOGITS and _runs_on_openvino(node, model):
        return openvino_reference(node.models[model], feeds)
    sess = _session(str(node.models[model]))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def io_specs(path) -> tuple[list, list]:
    """[(name, V2 datatype, shape with -1)] of the graph's real inputs and its outputs."""
    g = onnx.load(str(path)).graph
    inits = {t.name for t in g.initializer}

    def spec(v):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return (v.name, ONNX_TO_V2[t.elem_type], shape)

    return [spec(v) for v in g.input if v.name not in inits], [spec(v) for v in g.output]


_NP = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


def make_inputs(node, model: str, batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, dt, shape in io_specs(node.models[model])[0]:
        shape = [batch if d == -1 else d for d in shape]
        if dt in ("FP32", "FP64", "FP16"):
            if model.startswith("squeezenet"):
                arr = rng.random(shape)
            else:
                arr = rng.standard_normal(shape) * 2
            arr = arr.astype(_NP[dt])
        elif dt == "BOOL":
            arr = rng.random(shape) < 0.5
        elif dt == "UINT8":
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
        elif dt == "INT32":
            arr = rng.integers(-1000, 1000, shape, dtype=np.int32)
        else:
            arr = rng.integers(-50, 50, shape).astype(_NP[dt])
        feeds[name] = arr
    return feeds


def assert_matches(got: np.ndarray, ref: np.ndarray, what: str):
    assert got is not None, f"{what}: output missing from the response"
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != onnxruntime {ref.shape}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != onnxruntime {ref.dtype}"
    if np.issubdtype(ref.dtype, np.floating):
        tol = 1e-3 if ref.dtype == np.float16 else RTOL
        np.testing.assert_allclose(got, ref, rtol=tol, atol=ATOL, err_msg=what)
    else:
        np.testing.assert_array_equal(got, ref, err_msg=what)


# --- request helpers --------------------------------------------------------------------------


def infer_inputs(feeds: dict, binary: bool) -> list:
    inputs = []
    for name, arr in feeds.items():
        inp = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    return inputs


def expect_error(fn, status: str, *needles: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    e = info.value
    assert e.status() == status, f"expected HTTP {status}, got {e.status()}: {e.message()}"
    msg = e.message() or ""
    for n in needles:
        assert n in msg, f"error message {msg!r} does not mention {n!r}"
    return e


# --- server ----------------------------------------------------------------------------------


def test_server_live_ready_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md["name"]
    assert md["version"]
    for ext in ("binary_tensor_data", "model_configuration", "statistics", "model_repository"):
        assert ext in md["extensions"], f"extension {ext} not listed in {md['extensions']}"


def test_cli_inspect_json(node):
    proc = run_cli(node.bin, "inspect", str(node.bundles["gen_multi"]), "--json")
    doc = json.loads(proc.stdout)
    text = json.dumps(doc)
    for needle in ("gen_multi", '"a"', '"b"', '"c"', '"sum"', '"mask"'):
        assert needle in text, f"inspect --json lacks {needle}: {proc.stdout[:2000]}"


# --- model metadata, config, readiness -------------------------------------------------------


@pytest.mark.parametrize("model", ONNX_MODELS)
def test_model_metadata(client, node, model):
    md = client.get_model_metadata(model)
    assert md["name"] == model
    assert "1" in md["versions"]
    inputs, outputs = io_specs(node.models[model])
    got_in = [(t["name"], t["datatype"], list(t["shape"])) for t in md["inputs"]]
    got_out = [(t["name"], t["datatype"], list(t["shape"])) for t in md["outputs"]]
    assert sorted(got_in) == sorted(inputs)
    assert sorted(got_out) == sorted(outputs)


@pytest.mark.parametrize("model", ONNX_MODELS + ["mlp", "classifier"])
def test_model_ready(client, model):
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, model_version="1")


@pytest.mark.parametrize("model", ONNX_MODELS)
def test_model_config(client, node, model):
    cfg = client.get_model_config(model)
    assert cfg["name"] == model
    assert cfg.get("platform") or cfg.get("backend")
    mbs = int(cfg.get("max_batch_size", 0))
    inputs, outputs = io_specs(node.models[model])
    for section, specs in (("input", inputs), ("output", outputs)):
        got = {t["name"]: t for t in cfg[section]}
        assert set(got) == {s[0] for s in specs}, f"{section}: {list(got)}"
        for name, dt, shape in specs:
            assert got[name]["data_type"] == "TYPE_" + ("STRING" if dt == "BYTES" else dt), got[name]
            dims = [int(d) for d in got[name]["dims"]]
            expected = shape[1:] if mbs > 0 else shape
            assert dims == expected, f"{section} {name}: dims {dims}, max_batch_size {mbs}, shape {shape}"
        if mbs > 0:
            assert all(s[2] and s[2][0] == -1 for s in specs), f"max_batch_size {mbs} on a fixed batch"


def test_example_models_metadata(client):
    md = client.get_model_metadata("mlp")
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [("input", "FP32", [-1, 784])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["outputs"]] == [("output", "FP32", [-1, 10])]
    md = client.get_model_metadata("classifier")
    assert [(t["name"], t["datatype"]) for t in md["inputs"]] == [("image", "UINT8")]
    assert sorted((t["name"], t["datatype"]) for t in md["outputs"]) == [
        ("labels", "BYTES"),
        ("probabilities", "FP32"),
    ]


# --- inference against onnxruntime -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["json", "binary"])
@pytest.mark.parametrize("model", ONNX_MODELS)
def test_infer_matches_onnxruntime(client, node, model, mode):
    binary = mode == "binary"
    batch = 1 if model.startswith("squeezenet") else 3
    feeds = make_inputs(node, model, batch=batch, seed=zlib.crc32(f"{model}/{mode}".encode()) % 1000)
    ref = reference(node, model, feeds)
    if binary:
        outputs = None  # the client's default: all outputs, binary_data_output=true
    else:
        outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ref]
    result = client.infer(model, infer_inputs(feeds, binary), outputs=outputs)
    resp = result.get_response()
    assert resp["model_name"] == model
    assert sorted(o["name"] for o in resp["outputs"]) == sorted(ref)
    specs = {n: dt for n, dt, _ in io_specs(node.models[model])[1]}
    for name, r in ref.items():
        out = result.get_output(name)
        assert out["datatype"] == specs[name]
        if binary:
            assert "binary_data_size" in (out.get("parameters") or {}), out
        else:
            assert "data" in out, out
        assert_matches(result.as_numpy(name), r, f"{model}/{name} ({mode})")


def test_squeezenet_rw_top1(client, node):
    """The reweighted SqueezeNet's output depends on its input: the top classes agree with onnxruntime."""
    for seed in (1, 2):
        feeds = make_inputs(node, "squeezenet_rw", batch=1, seed=seed)
        ref = reference(node, "squeezenet_rw", feeds)["softmaxout_1"]
        got = client.infer("squeezenet_rw", infer_inputs(feeds, True)).as_numpy("softmaxout_1")
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6)
        assert int(got.argmax()) == int(ref.argmax())


def test_published_squeezenet_output(client, node):
    feeds = make_inputs(node, "squeezenet", batch=1, seed=3)
    got = client.infer("squeezenet", infer_inputs(feeds, True)).as_numpy("softmaxout_1")
    assert got.shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(got.sum(), 1.0, atol=1e-4)


@pytest.mark.parametrize("binary", [False, True])
def test_select_one_output(client, node, binary):
    feeds = make_inputs(node, "gen_multi", batch=4, seed=11)
    ref = reference(node, "gen_multi", feeds)
    for name in ("mask", "prod"):
        result = client.infer(
            "gen_multi",
            infer_inputs(feeds, binary),
            outputs=[httpclient.InferRequestedOutput(name, binary_data=binary)],
        )
        names = [o["name"] for o in result.get_response()["outputs"]]
        assert names == [name]
        assert_matches(result.as_numpy(name), ref[name], f"gen_multi/{name}")


def test_large_batch_binary(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=256, seed=5)
    ref = reference(node, "gen_mlp", feeds)
    result = client.infer("gen_mlp", infer_inputs(feeds, True))
    for name in ref:
        assert_matches(result.as_numpy(name), ref[name], f"gen_mlp/{name}")


def test_request_id_echoed(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=1)
    for binary in (False, True):
        rid = f"req-{int(binary)}-42"
        result = client.infer("gen_mlp", infer_inputs(feeds, binary), request_id=rid)
        assert result.get_response()["id"] == rid


def test_infer_explicit_version(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=2, seed=9)
    ref = reference(node, "gen_mlp", feeds)
    result = client.infer("gen_mlp", infer_inputs(feeds, True), model_version="1")
    assert_matches(result.as_numpy("logits"), ref["logits"], "gen_mlp/logits v1")


def check_classes(got: np.ndarray, ref: np.ndarray, k: int, batched: bool, what: str, label: str | None = None):
    """`got` (Triton's classification answer: "value:index" strings, "value:index:label" where
    the model names its classes as `label` and the index) against onnxruntime's output: per
    batch entry (or over the whole tensor), k entries, largest first, each value the
    reference's at its index, the first the reference's largest and the last its k-th."""
    rows = ref.reshape(ref.shape[0], -1) if batched else ref.reshape(1, -1)
    got = np.asarray(got).reshape(rows.shape[0], -1)
    assert got.shape[1] == min(k, rows.shape[1]), f"{what}: {got.shape}"
    for row, answer in zip(rows, got):
        parts = [(a.decode() if isinstance(a, bytes) else a).split(":", 2) for a in answer]
        values = [float(p[0]) for p in parts]
        indices = [int(p[1]) for p in parts]
        if label is None:
            assert all(len(p) == 2 for p in parts), f"{what}: {answer}"
        else:
            assert [p[2] for p in parts] == [f"{label}{i}" for i in indices], f"{what}: {answer}"
        assert values == sorted(values, reverse=True), f"{what}: {values}"
        np.testing.assert_allclose(values, row[indices], rtol=1e-3, atol=1e-5, err_msg=what)
        top = np.sort(row)[::-1]
        np.testing.assert_allclose(values[0], top[0], rtol=1e-3, atol=1e-5, err_msg=what)
        np.testing.assert_allclose(values[-1], top[len(values) - 1], rtol=1e-3, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("binary", [False, True])
def test_classification_extension(client, node, binary):
    """tritonclient's `class_count`, as Triton's image_client uses it: the seeded SqueezeNet (no
    batch dimension: top classes over its whole output) and the generated MLP (a batch of 3: top
    classes per row), checked against onnxruntime."""
    assert "classification" in client.get_server_metadata()["extensions"]
    config = client.get_model_config("squeezenet_rw")
    assert config["output"][0]["label_filename"] == "labels/output0.txt", config
    for model, output, batch, k, batched, label in [
        ("squeezenet_rw", "softmaxout_1", 1, 5, False, SQUEEZENET_LABEL),
        ("gen_mlp", "logits", 3, 3, True, None),
    ]:
        feeds = make_inputs(node, model, batch=batch, seed=31)
        ref = reference(node, model, feeds)[output]
        result = client.infer(
            model,
            infer_inputs(feeds, binary),
            outputs=[httpclient.InferRequestedOutput(output, binary_data=binary, class_count=k)],
        )
        out = result.get_output(output)
        assert out["datatype"] == "BYTES", out
        assert out["shape"] == ([batch, k] if batched else [k]), out
        check_classes(result.as_numpy(output), ref, k, batched, f"{model} (binary={binary})", label)
    # A count that is no count, or an output that holds no numbers, is refused; the next request
    # is served.
    feeds = make_inputs(node, "gen_mlp", batch=1)
    body = {
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": feeds["x"].ravel().tolist()}],
        "outputs": [{"name": "logits", "parameters": {"classification": 0}}],
    }
    r = requests.post(f"{node.base}/v2/models/gen_mlp/infer", json=body, timeout=30)
    assert r.status_code == 400 and "classification must be a count" in r.json()["error"], r.text
    body["outputs"][0]["parameters"]["classification"] = 2
    r = requests.post(f"{node.base}/v2/models/gen_mlp/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"] == [1, 2], r.json()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_answer(client, node, algorithm):
    """tritonclient's compression options: the real SqueezeNet's request sent compressed, its
    answer asked for compressed, both as JSON and binary, and the outputs match onnxruntime."""
    for binary in (False, True):
        feeds = make_inputs(node, "squeezenet", batch=1, seed=7 + binary)
        ref = reference(node, "squeezenet", feeds)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ref]
        result = client.infer(
            "squeezenet",
            infer_inputs(feeds, binary),
            outputs=outputs,
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        for name, r in ref.items():
            assert_matches(result.as_numpy(name), r, f"squeezenet/{name} ({algorithm}, binary={binary})")


def test_compressed_bodies_on_the_wire(node):
    """What the node says on the wire: the coding it answered in, and clear errors for a coding
    it does not speak and for a body that is not what its coding says, each followed by a good
    request that is served."""
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32", "data": [0.5] * 32}]}
    ).encode()
    url = f"{node.base}/v2/models/gen_mlp/infer"
    raw = requests.post(
        url,
        data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
        stream=True,
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["Content-Encoding"] == "gzip"
    plain = json.loads(gzip.decompress(raw.raw.read(decode_content=False)))
    assert plain["outputs"], plain
    for headers, data, status, needle in [
        ({"Content-Encoding": "br"}, body, 415, "'br' is not supported"),
        ({"Content-Encoding": "gzip"}, body, 400, "not valid gzip"),
        ({"Content-Encoding": "deflate"}, gzip.compress(body)[:20], 400, "not valid deflate"),
    ]:
        r = requests.post(url, data=data, headers=headers, timeout=30)
        assert r.status_code == status, r.text
        assert needle in r.json()["error"], r.json()
        good = requests.post(url, data=zlib.compress(body), headers={"Content-Encoding": "deflate"}, timeout=30)
        assert good.status_code == 200, good.text
        assert good.json()["outputs"][0]["data"] == plain["outputs"][0]["data"]


# --- built-in examples -----------------------------------------------------------------------


def _mlp(client, x: np.ndarray, binary=True) -> np.ndarray:
    out = [httpclient.InferRequestedOutput("output", binary_data=binary)]
    return client.infer("mlp", infer_inputs({"input": x}, binary), outputs=out).as_numpy("output")


def test_example_mlp(client):
    rng = np.random.default_rng(21)
    x = rng.random((3, 784), dtype=np.float32)
    y = _mlp(client, x)
    assert y.shape == (3, 10) and y.dtype == np.float32
    assert np.isfinite(y).all()
    # Determinism, and JSON and binary agree.
    np.testing.assert_array_equal(_mlp(client, x), y)
    np.testing.assert_allclose(_mlp(client, x, binary=False), y, rtol=1e-6, atol=1e-6)
    # Batch consistency: each row alone gives the same row.
    for i in range(3):
        yi = _mlp(client, x[i : i + 1])
        assert yi.shape == (1, 10)
        np.testing.assert_allclose(yi[0], y[i], rtol=1e-5, atol=1e-5)
    # Different inputs give different outputs.
    assert not np.allclose(y[0], y[1])


@pytest.mark.parametrize("binary", [False, True])
def test_example_classifier(client, binary):
    rng = np.random.default_rng(22)
    img = rng.integers(0, 256, (4, 64), dtype=np.uint8)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "labels")]
    result = client.infer("classifier", infer_inputs({"image": img}, binary), outputs=outs)
    probs = result.as_numpy("probabilities")
    labels = result.as_numpy("labels")
    assert probs.shape == (4, 10) and probs.dtype == np.float32
    assert labels.shape == (4, 3)
    assert result.get_output("labels")["datatype"] == "BYTES"
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for row in range(4):
        scores = []
        for k in range(3):
            item = labels[row, k]
            item = item.decode() if isinstance(item, bytes) else str(item)
            score, index, label = item.split(":")
            index = int(index)
            assert label == names[index], item
            assert abs(float(score) - probs[row, index]) < 1e-5, (item, probs[row])
            scores.append(float(score))
        assert scores == sorted(scores, reverse=True)
        first = labels[row, 0]
        first = first.decode() if isinstance(first, bytes) else str(first)
        assert int(first.split(":")[1]) == int(np.argmax(probs[row]))


# --- errors ----------------------------------------------------------------------------------


def test_error_unknown_model(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=1)
    expect_error(lambda: client.infer("no_such_model", infer_inputs(feeds, True)), "404", "no_such_model")
    expect_error(lambda: client.get_model_metadata("no_such_model"), "404", "no_such_model")
    assert not client.is_model_ready("no_such_model")


def test_error_unknown_version(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=1)
    expect_error(lambda: client.infer("gen_mlp", infer_inputs(feeds, True), model_version="99"), "404")
    expect_error(lambda: client.get_model_metadata("gen_mlp", model_version="99"), "404")


@pytest.mark.parametrize("binary", [False, True])
def test_error_wrong_datatype(client, binary):
    x = np.zeros((1, 16), dtype=np.float64)
    expect_error(lambda: client.infer("gen_mlp", infer_inputs({"x": x}, binary)), "400", "x")
    # The message names the input and the expected datatype.
    e = expect_error(lambda: client.infer("gen_mlp", infer_inputs({"x": x}, binary)), "400")
    assert "FP32" in e.message() or "FP64" in e.message(), e.message()


@pytest.mark.parametrize("binary", [False, True])
def test_error_wrong_shape(client, binary):
    x = np.zeros((1, 15), dtype=np.float32)
    expect_error(lambda: client.infer("gen_mlp", infer_inputs({"x": x}, binary)), "400", "x")
    x3 = np.zeros((1, 4, 4), dtype=np.float32)
    expect_error(lambda: client.infer("gen_mlp", infer_inputs({"x": x3}, binary)), "400", "x")


def test_error_missing_input(client, node):
    feeds = make_inputs(node, "gen_multi", batch=2)
    del feeds["c"]
    expect_error(lambda: client.infer("gen_multi", infer_inputs(feeds, True)), "400", "c")


def test_error_unknown_output(client, node):
    feeds = make_inputs(node, "gen_mlp", batch=1)
    out = [httpclient.InferRequestedOutput("nope", binary_data=True)]
    expect_error(lambda: client.infer("gen_mlp", infer_inputs(feeds, True), outputs=out), "400", "nope")


def test_error_malformed_json(node):
    r = requests.post(
        f"{node.base}/v2/models/gen_mlp/infer",
        data=b'{"inputs": [{"name": "x", "shape": [1, 16], ',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body


def test_error_data_count_mismatch(node):
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 15}]}
    r = requests.post(f"{node.base}/v2/models/gen_mlp/infer", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert "error" in r.json()


# --- statistics, repository, metrics ---------------------------------------------------------


def _stats(client, model):
    st = client.get_inference_statistics(model)
    entries = [m for m in st["model_stats"] if m["name"] == model]
    assert entries, st
    for m in entries:
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            assert set(m["inference_stats"][key]) >= {"count", "ns"}, m
    return {
        "success": sum(int(m["inference_stats"]["success"]["count"]) for m in entries),
        "inference_count": sum(int(m.get("inference_count", 0)) for m in entries),
        "success_ns": sum(int(m["inference_stats"]["success"]["ns"]) for m in entries),
    }


def test_statistics_count_successes(client, node):
    before = _stats(client, "gen_types")
    n = 5
    for i in range(n):
        feeds = make_inputs(node, "gen_types", batch=2, seed=100 + i)
        client.infer("gen_types", infer_inputs(feeds, True))
    after = _stats(client, "gen_types")
    assert after["success"] - before["success"] == n, (before, after)
    assert after["inference_count"] - before["inference_count"] >= n, (before, after)
    assert after["success_ns"] > before["success_ns"]
    all_stats = client.get_inference_statistics()
    assert {"gen_types", "mlp"} <= {m["name"] for m in all_stats["model_stats"]}


def test_repository_index(client):
    index = client.get_model_repository_index()
    states = {e["name"]: e.get("state") for e in index}
    for model in ONNX_MODELS + ["mlp", "classifier"]:
        assert states.get(model) == "READY", f"{model}: {states.get(model)} in {index}"


def test_unload_then_load(client, node):
    model = "gen_fp16"
    feeds = make_inputs(node, model, batch=2, seed=33)
    ref = reference(node, model, feeds)
    try:
        client.unload_model(model)
        assert not client.is_model_ready(model)
        expect_error(lambda: client.infer(model, infer_inputs(feeds, True)), "503")
        index = {e["name"]: e.get("state") for e in client.get_model_repository_index()}
        assert index.get(model) not in (None, "READY"), index
        # Other models keep serving.
        assert client.is_model_ready("gen_mlp")
    finally:
        client.load_model(model)
    assert client.is_model_ready(model)
    # A load that would change the model's configuration is refused, not silently ignored, and
    # the model keeps serving as published.
    expect_error(lambda: client.load_model(model, config='{"max_batch_size": 2}'), "400", "signed")
    assert client.get_model_config(model)["max_batch_size"] != 2
    result = client.infer(model, infer_inputs(feeds, True))
    for name in ref:
        assert_matches(result.as_numpy(name), ref[name], f"{model}/{name} after reload")


def test_metrics(client, node):
    client.infer("gen_mlp", infer_inputs(make_inputs(node, "gen_mlp", batch=1), True))
    r = requests.get(f"{node.base}/metrics", timeout=30)
    assert r.status_code == 200
    assert "sophon_inference_requests_total" in r.text
    assert re.search(r'sophon_inference_requests_total\{[^}]*model="gen_mlp"[^}]*\}\s+\d', r.text), r.text[:3000]


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_clients(node):
    threads, per_thread = 8, 20
    errors: list = []

    def worker(t: int):
        c = httpclient.InferenceServerClient(url=node.url, connection_timeout=30, network_timeout=120)
        try:
            for i in range(per_thread):
                model = "gen_mlp" if (t + i) % 2 == 0 else "gen_multi"
                feeds = make_inputs(node, model, batch=1 + (i % 4), seed=t * 1000 + i)
                ref = reference(node, model, feeds)
                result = c.infer(model, infer_inputs(feeds, i % 3 != 0), request_id=f"{t}-{i}")
                assert result.get_response().get("id") == f"{t}-{i}"
                for name in ref:
                    assert_matches(result.as_numpy(name), ref[name], f"{model}/{name} thread {t} req {i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {type(e).__name__}: {e}")
        finally:
            c.close()

    # Warm the reference sessions in this thread (onnxruntime session creation is not reentrant-safe here).
    reference(node, "gen_mlp", make_inputs(node, "gen_mlp", batch=1))
    reference(node, "gen_multi", make_inputs(node, "gen_multi", batch=1))
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    assert not any(t.is_alive() for t in ts), "some threads hung"
    assert not errors, "\n".join(errors[:10])
