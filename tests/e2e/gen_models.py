"""Generate the ONNX models the end-to-end suite packs and serves, and locate the published ones.

Everything is built with the `onnx` helper API from seeded numpy weights (no torch, no downloads),
so the files are the same on every run. Usable as a module (`generate(out_dir)`) or as a script:

    python tests/e2e/gen_models.py OUT_DIR

Models (name -> what it exercises):
- ``gen_mlp``: FP32 16 -> 32 -> 8 MLP (MatMul, Add, Relu, Softmax), symbolic batch dim, two outputs.
- ``gen_multi``: three inputs of three datatypes (FP32, INT64, BOOL) and four outputs (FP32, INT64,
  BOOL, INT32), all with a symbolic batch dim.
- ``gen_types``: UINT8, INT32 and FP64 inputs; FP64, INT32 and UINT8 outputs.
- ``gen_fp16``: an FP16 input, FP16 and FP32 outputs.
- ``squeezenet``: the published ``light_squeezenet.onnx`` that ships in the ``onnx`` wheel (the ONNX
  model zoo's SqueezeNet 1.0 architecture with its weights replaced by ``ConstantOfShape`` fills),
  copied byte for byte: IR version 3, opset 9, initializers also listed as graph inputs.
- ``squeezenet_rw``: the same published graph with each ``ConstantOfShape`` fill replaced by a seeded
  random initializer, so that its output actually depends on its input (the published one's
  constant weights make every class score equal).
- ``sigmoid``: ``onnxruntime/datasets/sigmoid.onnx`` from the onnxruntime wheel, copied byte for byte.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="sophon-e2e",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, elem: int, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def make_mlp(seed: int = 1234) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) * 0.35).astype(np.float32)
    b1 = (rng.standard_normal(32) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((32, 8)) * 0.25).astype(np.float32)
    b2 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "gen_mlp",
        inputs=[_vi("x", TensorProto.FLOAT, ["batch", 16])],
        outputs=[
            _vi("logits", TensorProto.FLOAT, ["batch", 8]),
            _vi("probs", TensorProto.FLOAT, ["batch", 8]),
        ],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(b2, "b2"),
        ],
    )
    return _model(graph)


def make_multi() -> onnx.ModelProto:
    """a FP32, b INT64, c BOOL -> sum FP32, prod INT64, mask BOOL, idx INT32."""
    zero = numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero")
    three = numpy_helper.from_array(np.array(3, dtype=np.int64), "three")
    nodes = [
        # sum = a + float(b)
        helper.make_node("Cast", ["b"], ["b_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_f"], ["sum"]),
        # prod = b * int64(c) + 3
        helper.make_node("Cast", ["c"], ["c_i"], to=TensorProto.INT64),
        helper.make_node("Mul", ["b", "c_i"], ["bc"]),
        helper.make_node("Add", ["bc", "three"], ["prod"]),
        # mask = (a > 0) and not c
        helper.make_node("Greater", ["a", "zero"], ["a_pos"]),
        helper.make_node("Not", ["c"], ["not_c"]),
        helper.make_node("And", ["a_pos", "not_c"], ["mask"]),
        # idx = int32(where(c, b, -b))
        helper.make_node("Neg", ["b"], ["neg_b"]),
        helper.make_node("Where", ["c", "b", "neg_b"], ["sel"]),
        helper.make_node("Cast", ["sel"], ["idx"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "gen_multi",
        inputs=[
            _vi("a", TensorProto.FLOAT, ["batch", 4]),
            _vi("b", TensorProto.INT64, ["batch", 4]),
            _vi("c", TensorProto.BOOL, ["batch", 4]),
        ],
        outputs=[
            _vi("sum", TensorProto.FLOAT, ["batch", 4]),
            _vi("prod", TensorProto.INT64, ["batch", 4]),
            _vi("mask", TensorProto.BOOL, ["batch", 4]),
            _vi("idx", TensorProto.INT32, ["batch", 4]),
        ],
        initializer=[zero, three],
    )
    return _model(graph)


def make_types() -> onnx.ModelProto:
    """u UINT8, i INT32, d FP64 -> mixed FP64, sq INT32, u_out UINT8."""
    nodes = [
        # mixed = double(u) * d + double(i)
        helper.make_node("Cast", ["u"], ["u_d"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["i"], ["i_d"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["u_d", "d"], ["ud"]),
        helper.make_node("Add", ["ud", "i_d"], ["mixed"]),
        # sq = i * i
        helper.make_node("Mul", ["i", "i"], ["sq"]),
        # u_out = uint8(int32(u) mod 7)   (computed in INT32, cast back)
        helper.make_node("Cast", ["u"], ["u_i"], to=TensorProto.INT32),
        helper.make_node("Mod", ["u_i", "seven"], ["u_m"]),
        helper.make_node("Cast", ["u_m"], ["u_out"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes,
        "gen_types",
        inputs=[
            _vi("u", TensorProto.UINT8, ["batch", 3]),
            _vi("i", TensorProto.INT32, ["batch", 3]),
            _vi("d", TensorProto.DOUBLE, ["batch", 3]),
        ],
        outputs=[
            _vi("mixed", TensorProto.DOUBLE, ["batch", 3]),
            _vi("sq", TensorProto.INT32, ["batch", 3]),
            _vi("u_out", TensorProto.UINT8, ["batch", 3]),
        ],
        initializer=[numpy_helper.from_array(np.array(7, dtype=np.int32), "seven")],
    )
    return _model(graph)


def make_fp16() -> onnx.ModelProto:
    """h FP16 -> h2 FP16 (= h * 2 via FP32), h32 FP32 (= float(h))."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["h32", "two"], ["h32x2"]),
        helper.make_node("Cast", ["h32x2"], ["h2"], to=TensorProto.FLOAT16),
    ]
    graph = helper.make_graph(
        nodes,
        "gen_fp16",
        inputs=[_vi("h", TensorProto.FLOAT16, ["batch", 4])],
        outputs=[
            _vi("h2", TensorProto.FLOAT16, ["batch", 4]),
            _vi("h32", TensorProto.FLOAT, ["batch", 4]),
        ],
        initializer=[two],
    )
    return _model(graph)


# --- published models that ship inside wheels the suite installs anyway ---------------------------


def published_squeezenet() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"


def published_sigmoid() -> Path:
    import onnxruntime

    return Path(onnxruntime.__file__).parent / "datasets" / "sigmoid.onnx"


def make_squeezenet_rw(seed: int = 7) -> onnx.ModelProto:
    """The published light SqueezeNet with its ConstantOfShape weight fills made seeded-random."""
    src = onnx.load(str(published_squeezenet()))
    graph = src.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rng = np.random.default_rng(seed)
    new_nodes = []
    new_inits = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            new_nodes.append(node)
            continue
        shape = tuple(int(d) for d in inits[node.input[0]])
        out = node.output[0]
        if len(shape) == 4:  # conv weight [out, in, kh, kw]: He-style scale keeps activations O(1)
            fan_in = shape[1] * shape[2] * shape[3]
            arr = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        else:  # bias
            arr = rng.standard_normal(shape) * 0.05
        new_inits.append(numpy_helper.from_array(arr.astype(np.float32), out))
    shape_inputs = {n.input[0] for n in graph.node if n.op_type == "ConstantOfShape"}
    kept_inits = [t for t in graph.initializer if t.name not in shape_inputs]
    new_inits = kept_inits + new_inits
    data_inputs = [i for i in graph.input if i.name not in inits]
    new_graph = helper.make_graph(
        new_nodes, graph.name + "_rw", inputs=data_inputs, outputs=list(graph.output), initializer=new_inits
    )
    model = helper.make_model(new_graph, opset_imports=list(src.opset_import), producer_name="sophon-e2e")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


GENERATED = {
    "gen_mlp": make_mlp,
    "gen_multi": make_multi,
    "gen_types": make_types,
    "gen_fp16": make_fp16,
    "squeezenet_rw": make_squeezenet_rw,
}

PUBLISHED = {
    "squeezenet": published_squeezenet,
    "sigmoid": published_sigmoid,
}


def generate(out_dir: os.PathLike | str) -> dict[str, Path]:
    """Write every model into out_dir as NAME.onnx; return {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, make in GENERATED.items():
        path = out / f"{name}.onnx"
        onnx.save(make(), str(path))
        paths[name] = path
    for name, locate in PUBLISHED.items():
        src = locate()
        if not src.is_file():
            raise FileNotFoundError(f"published model {name} not found at {src}: reinstall tests/e2e/requirements.txt")
        path = out / f"{name}.onnx"
        shutil.copyfile(src, path)
        paths[name] = path
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    for name, path in generate(sys.argv[1]).items():
        print(f"{name}\t{path}")
