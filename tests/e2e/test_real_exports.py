"""Real ONNX exports that a PyPI package ships, served by `sophon dev` and compared with onnxruntime.

The three PaddleOCR models in the `rapidocr-onnxruntime` wheel (scripts/test installs it without
its dependencies, for the files) have variable input dimensions of both kinds that tract finds
hard: unnamed ones (`?`, or -1 in the file) and height and width that go through stride
arithmetic into Concat and Resize nodes. On tract, the node loads each one as `sophon pack --onnx`
packs it and makes a plan per set of input shapes; `--shape` pins the dimensions instead. Each also
runs on ONNX Runtime and OpenVINO, and, with no backend named, where the node measures it fastest.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import new_publisher, pack, run_cli, start_dev, stop_dev

# name -> (file in the wheel, input shapes to try, in order; a shape seen before reuses its plan)
MODELS = {
    # text detection: DBNet, stride-32 arithmetic on height and width
    "ocr_det": ("ch_PP-OCRv4_det_infer.onnx", [(1, 3, 320, 320), (1, 3, 256, 416), (1, 3, 320, 320)]),
    # text direction: batch, height and width all -1 or unnamed in the file
    "ocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", [(1, 3, 48, 192), (3, 3, 48, 192)]),
    # text recognition: SVTR, an unnamed height and a variable width
    "ocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", [(1, 3, 48, 320), (2, 3, 48, 160)]),
}
PINNED = (1, 3, 320, 320)


def wheel_models() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "rapidocr-onnxruntime is not installed: scripts/test installs it with\n"
            "  .venv/bin/pip install --no-deps -r tests/e2e/requirements-models.txt",
            pytrace=False,
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@pytest.fixture(scope="module")
def ocr(tmp_path_factory, sophon_bin):
    work = tmp_path_factory.mktemp("sophon-real-exports")
    key, pub = new_publisher(sophon_bin, work)
    files = {name: wheel_models() / f for name, (f, _) in MODELS.items()}
    bundles = {}
    for name, path in list(files.items()):
        bundles[name] = pack(sophon_bin, key, path, name, work / f"{name}.sbundle", "--backend", "tract")
        for backend in ["ort", "openvino"]:
            files[f"{name}_{backend}"] = path
            bundles[f"{name}_{backend}"] = pack(
                sophon_bin, key, path, f"{name}_{backend}", work / f"{name}_{backend}.sbundle", "--backend", backend
            )
    # No backend named: the node measures them (onnxruntime dies on this one's synthetic input).
    files["ocr_rec_auto"] = files["ocr_rec"]
    bundles["ocr_rec_auto"] = pack(sophon_bin, key, files["ocr_rec"], "ocr_rec_auto", work / "rec_auto.sbundle")
    shape = ",".join(map(str, PINNED))
    bundles["ocr_det_pinned"] = pack(
        sophon_bin, key, files["ocr_det"], "ocr_det_pinned", work / "pinned.sbundle", "--shape", f"x:{shape}",
        "--backend", "tract",
    )
    n = start_dev(sophon_bin, work, pub, files, bundles)
    yield n
    stop_dev(n)


def infer(client, model: str, x: np.ndarray) -> np.ndarray:
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [inp])
    return result.as_numpy(result.get_response()["outputs"][0]["name"])


@pytest.fixture(scope="module")
def ocr_client(ocr):
    c = httpclient.InferenceServerClient(url=ocr.url, connection_timeout=30, network_timeout=300)
    yield c
    c.close()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("backend", ["tract", "ort", "openvino"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_variable_dims_match_onnxruntime(ocr, ocr_client, model, backend):
    path = ocr.models[model]
    ref = session(path)
    served = model if backend == "tract" else f"{model}_{backend}"
    how = ocr_client.get_model_config(served)["parameters"]["sophon_graph_model"]["string_value"]
    assert how.startswith({"tract": "tract", "ort": "onnxruntime", "openvino": "openvino"}[backend]), how
    rng = np.random.default_rng(7)
    for shape in MODELS[model][1]:
        x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        want = ref.run(None, {"x": x})[0]
        got = infer(ocr_client, served, x)
        assert got.shape == want.shape, (model, shape, got.shape, want.shape)
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3, err_msg=f"{model} on {backend} at {shape}")


def test_a_backend_that_dies_measuring_is_passed_over(ocr, ocr_client):
    # The node times each backend in a child process: onnxruntime's SIGFPE on the recognizer's
    # synthetic input kills that child, not the node, and the model runs on another backend.
    how = ocr_client.get_model_config("ocr_rec_auto")["parameters"]["sophon_graph_model"]["string_value"]
    assert not how.startswith("onnxruntime"), how
    if "as measured at an earlier load" not in how:  # a shared SOPHON_E2E_CACHE_DIR may hold it
        assert "ort: its process died (signal 8)" in how, how
    x = (np.random.default_rng(5).standard_normal((1, 3, 48, 320)) * 0.5).astype(np.float32)
    want = session(ocr.models["ocr_rec"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(infer(ocr_client, "ocr_rec_auto", x), want, atol=1e-3, rtol=1e-3)


def test_plans_per_shape_are_bounded_and_stay_right(ocr, ocr_client):
    # More batch sizes than the node keeps plans for (8): old plans go, answers stay right.
    ref = session(ocr.models["ocr_cls"])
    rng = np.random.default_rng(11)
    for batch in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]:
        x = rng.standard_normal((batch, 3, 48, 96)).astype(np.float32)
        np.testing.assert_allclose(
            infer(ocr_client, "ocr_cls", x), ref.run(None, {"x": x})[0], atol=1e-3, rtol=1e-3, err_msg=f"batch {batch}"
        )


def test_a_pinned_shape_is_one_plan_and_refuses_other_shapes(ocr, ocr_client):
    meta = ocr_client.get_model_metadata("ocr_det_pinned")
    assert [int(d) for d in meta["inputs"][0]["shape"]] == list(PINNED), meta
    bad = np.zeros((1, 3, 256, 256), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        infer(ocr_client, "ocr_det_pinned", bad)
    assert "400" in str(refused.value) and "expects [1, 3, 320, 320]" in str(refused.value), refused.value
    # The refused request left nothing behind: the next one is answered, and right.
    x = np.random.default_rng(3).standard_normal(PINNED).astype(np.float32)
    want = session(ocr.models["ocr_det"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(infer(ocr_client, "ocr_det_pinned", x), want, atol=1e-3, rtol=1e-3)
    # Pinned, the graph has one plan; unpinned, a plan per set of input shapes.
    how = ocr_client.get_model_config("ocr_det_pinned")["parameters"]["sophon_graph_model"]["string_value"]
    assert "one plan for every input shape" in how, how
    how = ocr_client.get_model_config("ocr_det")["parameters"]["sophon_graph_model"]["string_value"]
    assert "a plan per set of input shapes" in how and "Concat" in how, how


def test_inspect_shows_the_pinned_shape_and_pack_refuses_bad_pins(ocr, sophon_bin):
    shown = subprocess.run(
        [sophon_bin, "inspect", str(ocr.bundles["ocr_det_pinned"])], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "analysed with x [1, 3, 320, 320]" in shown.stdout, shown.stdout
    key = ocr.workdir / "publisher.key"
    for pin, said in [
        ("x:1,4,320,320", "fixes it at 3"),
        ("y:1,3,320,320", "the model's inputs are"),
        ("x:1,3", "declares 4"),
        ("x:1,3,a,1", "not a size"),
    ]:
        out = subprocess.run(
            [sophon_bin, "pack", "--onnx", str(ocr.models["ocr_det"]), "--name", "bad", "--key", str(key),
             "-o", str(ocr.workdir / "bad.sbundle"), "--shape", pin],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode != 0 and said in out.stderr, (pin, out.stderr)


def test_the_pack_check_survives_a_backend_that_kills_its_process(ocr, sophon_bin):
    # onnxruntime raises SIGFPE running the recognizer on a 32-pixel-high input (Python's
    # onnxruntime dies the same way). The check runs each backend in a child process, so pack
    # reports it and goes on.
    out = run_cli(
        sophon_bin, "pack", "--onnx", str(ocr.models["ocr_rec"]), "--name", "rec_checked",
        "--key", str(ocr.workdir / "publisher.key"), "-o", str(ocr.workdir / "rec_checked.sbundle"),
    )
    assert "tract loaded it and ran it" in out.stdout, out.stdout
    assert "ort   loaded it, then the process died (signal 8)" in out.stdout, out.stdout
    shown = run_cli(sophon_bin, "inspect", str(ocr.workdir / "rec_checked.sbundle"))
    assert "loads on   tract, ort" in shown.stdout, shown.stdout
