"""End to end over gRPC: the real `tritonclient[grpc]` against the same `sophon dev` as the HTTP
suite, outputs checked against onnxruntime, errors with Triton's status codes, streaming, and
the `grpc.health.v1` check."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from test_triton_client import ONNX_MODELS, assert_matches, check_classes, make_inputs, reference


@pytest.fixture(scope="module")
def gclient(node):
    c = grpcclient.InferenceServerClient(url=node.grpc_url)
    yield c
    c.close()


def grpc_inputs(feeds: dict) -> list:
    inputs = []
    for name, arr in feeds.items():
        inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def expect_grpc_error(fn, code: str, *needles: str):
    with pytest.raises(InferenceServerException) as info:
        fn()
    e = info.value
    assert e.status() == f"StatusCode.{code}", f"expected {code}, got {e.status()}: {e.message()}"
    for n in needles:
        assert n in (e.message() or ""), f"error {e.message()!r} does not mention {n!r}"


def test_server_live_ready_metadata(gclient):
    assert gclient.is_server_live()
    assert gclient.is_server_ready()
    meta = gclient.get_server_metadata(as_json=True)
    assert meta["name"] == "sophon" and "model_configuration" in meta["extensions"], meta


@pytest.mark.parametrize("model", ONNX_MODELS)
def test_metadata_config_and_infer_match_onnxruntime(gclient, client, node, model):
    assert gclient.is_model_ready(model)
    meta = gclient.get_model_metadata(model, as_json=True)
    assert meta["name"] == model and meta["inputs"], meta
    # Both protocols tell the same: every version served, and the platform of the config.
    http_meta = client.get_model_metadata(model)
    assert meta["versions"] == http_meta["versions"], (meta, http_meta)
    assert meta["platform"] == http_meta["platform"] == client.get_model_config(model)["platform"]
    config = gclient.get_model_config(model, as_json=True)["config"]
    assert config["name"] == model and config["instance_group"][0]["kind"] == "KIND_CPU", config
    for batch in [1, 3]:
        feeds = make_inputs(node, model, batch=batch, seed=batch)
        want = reference(node, model, feeds)
        result = gclient.infer(model, grpc_inputs(feeds), request_id=f"req-{batch}")
        assert result.get_response().id == f"req-{batch}"
        for output, ref in want.items():
            assert_matches(result.as_numpy(output), ref, f"{model}/{output} batch {batch} over gRPC")


def test_requested_outputs(gclient, node):
    feeds = make_inputs(node, "gen_multi", batch=2)
    want = reference(node, "gen_multi", feeds)
    first = sorted(want)[0]
    result = gclient.infer("gen_multi", grpc_inputs(feeds), outputs=[grpcclient.InferRequestedOutput(first)])
    outputs = [o.name for o in result.get_response().outputs]
    assert outputs == [first], outputs
    assert_matches(result.as_numpy(first), want[first], f"gen_multi/{first}")


def test_errors_have_triton_codes_and_leave_the_model_serving(gclient, node):
    expect_grpc_error(lambda: gclient.get_model_metadata("no_such_model"), "NOT_FOUND", "no_such_model")
    # A load with a configuration of its own would serve what nobody signed.
    expect_grpc_error(lambda: gclient.load_model("gen_mlp", config='{"max_batch_size": 2}'),
                      "INVALID_ARGUMENT", "config", "signed")
    assert gclient.is_model_ready("gen_mlp")
    feeds = make_inputs(node, "gen_mlp", batch=2)
    name = next(iter(feeds))
    wrong_type = grpcclient.InferInput(name, list(feeds[name].shape), "INT32")
    wrong_type.set_data_from_numpy(feeds[name].astype(np.int32))
    expect_grpc_error(lambda: gclient.infer("gen_mlp", [wrong_type]), "INVALID_ARGUMENT", name)
    short = grpcclient.InferInput(name, [2, 3], "FP32")
    short.set_data_from_numpy(np.zeros((2, 3), np.float32))
    expect_grpc_error(lambda: gclient.infer("gen_mlp", [short]), "INVALID_ARGUMENT")
    expect_grpc_error(lambda: gclient.infer("no_such_model", grpc_inputs(feeds)), "NOT_FOUND")
    # The bad requests left nothing behind: the next one is answered, and right.
    want = reference(node, "gen_mlp", feeds)
    result = gclient.infer("gen_mlp", grpc_inputs(feeds))
    for output, ref in want.items():
        assert_matches(result.as_numpy(output), ref, f"gen_mlp/{output} after errors")


def test_bool_bytes_and_doubled_contents_are_refused(gclient, node):
    # A BOOL byte other than 0 or 1, as HTTP's binary data refuses it.
    feeds = make_inputs(node, "gen_multi", batch=1)
    inputs = grpc_inputs(feeds)
    mask = feeds["c"].astype(np.uint8)
    mask[0, 1] = 2
    c = next(i for i in inputs if i.name() == "c")
    c.set_data_from_numpy(mask.view(np.bool_))
    expect_grpc_error(lambda: gclient.infer("gen_multi", inputs), "INVALID_ARGUMENT", "0 or 1")
    # Raw contents and typed contents for one input: which would count is anyone's guess.
    feeds = make_inputs(node, "gen_mlp", batch=2)
    both = grpc_inputs(feeds)
    both[0]._get_tensor().contents.fp32_contents.extend([1.0, 2.0])
    expect_grpc_error(lambda: gclient.infer("gen_mlp", both), "INVALID_ARGUMENT", "both")
    # Nothing left behind: the next requests are answered, and right.
    for model in ("gen_multi", "gen_mlp"):
        feeds = make_inputs(node, model, batch=2)
        want = reference(node, model, feeds)
        result = gclient.infer(model, grpc_inputs(feeds))
        for output, ref in want.items():
            assert_matches(result.as_numpy(output), ref, f"{model}/{output} after errors")


def test_classification_extension(gclient, node):
    """`class_count` over gRPC: the classes come back as BYTES, per row of a batched model."""
    feeds = make_inputs(node, "gen_mlp", batch=3, seed=8)
    ref = reference(node, "gen_mlp", feeds)["logits"]
    result = gclient.infer(
        "gen_mlp", grpc_inputs(feeds), outputs=[grpcclient.InferRequestedOutput("logits", class_count=4)]
    )
    out = result.get_response().outputs[0]
    assert out.datatype == "BYTES" and list(out.shape) == [3, 4], out
    check_classes(result.as_numpy("logits"), ref, 4, True, "gen_mlp over gRPC")
    # A negative count is no count: INVALID_ARGUMENT, and the model serves on.
    expect_grpc_error(
        lambda: gclient.infer(
            "gen_mlp", grpc_inputs(feeds), outputs=[grpcclient.InferRequestedOutput("logits", class_count=-1)]
        ),
        "INVALID_ARGUMENT",
        "classification must be a count",
    )
    result = gclient.infer("gen_mlp", grpc_inputs(feeds))
    assert_matches(result.as_numpy("logits"), ref, "gen_mlp after classification")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(gclient, node, algorithm):
    """tritonclient's `compression_algorithm`: the real SqueezeNet's request compressed on the
    wire, unary and on a stream, answered as onnxruntime answers it."""
    feeds = make_inputs(node, "squeezenet", batch=1, seed=5)
    want = reference(node, "squeezenet", feeds)
    result = gclient.infer("squeezenet", grpc_inputs(feeds), compression_algorithm=algorithm)
    for output, ref in want.items():
        assert_matches(result.as_numpy(output), ref, f"squeezenet/{output} over gRPC ({algorithm})")
    answers: queue.Queue = queue.Queue()
    gclient.start_stream(
        callback=lambda result, error: answers.put((result, error)), compression_algorithm=algorithm
    )
    try:
        for i in range(3):
            gclient.async_stream_infer("squeezenet", grpc_inputs(feeds), request_id=str(i))
        for i in range(3):
            result, error = answers.get(timeout=60)
            assert error is None, error
            assert result.get_response().id == str(i)
            for output, ref in want.items():
                assert_matches(result.as_numpy(output), ref, f"squeezenet/{output} streamed ({algorithm})")
    finally:
        gclient.stop_stream()


def test_statistics_count_grpc_requests(gclient, node):
    before = gclient.get_inference_statistics("gen_mlp", as_json=True)["model_stats"][0]
    feeds = make_inputs(node, "gen_mlp", batch=1)
    gclient.infer("gen_mlp", grpc_inputs(feeds))
    after = gclient.get_inference_statistics("gen_mlp", as_json=True)["model_stats"][0]
    count = lambda s: int(s.get("inference_stats", {}).get("success", {}).get("count", 0))  # noqa: E731
    assert count(after) == count(before) + 1, (before, after)


def test_repository_index(gclient):
    index = gclient.get_model_repository_index(as_json=True)["models"]
    assert any(m["name"] == "gen_mlp" and m["state"] == "READY" for m in index), index


def test_stream_answers_each_request(gclient, node):
    answers: queue.Queue = queue.Queue()
    gclient.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        feeds = [make_inputs(node, "gen_mlp", batch=1, seed=s) for s in range(3)]
        for i, f in enumerate(feeds):
            gclient.async_stream_infer("gen_mlp", grpc_inputs(f), request_id=str(i))
        bad = grpcclient.InferInput("nope", [1], "FP32")
        bad.set_data_from_numpy(np.zeros(1, np.float32))
        gclient.async_stream_infer("gen_mlp", [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        gclient.stop_stream()
    for i, (result, error) in enumerate(got[:3]):
        assert error is None, error
        want = reference(node, "gen_mlp", feeds[i])
        for output, ref in want.items():
            assert_matches(result.as_numpy(output), ref, f"stream request {i}")
    result, error = got[3]
    assert result is None and error is not None and "nope" in str(error), (result, error)


def test_health_service(node):
    # grpc.health.v1.Health/Check with an empty service name: the answer is SERVING (status 1),
    # encoded by hand (HealthCheckResponse has one enum field, number 1).
    with grpc.insecure_channel(node.grpc_url) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        assert check(b"", timeout=10) == b"\x08\x01"
        # The inference service by its full name, too.
        name = b"inference.GRPCInferenceService"
        assert check(b"\x0a" + bytes([len(name)]) + name, timeout=10) == b"\x08\x01"
