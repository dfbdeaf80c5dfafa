"""The models of scripts/bench-batching, written to DIR: sq.onnx (the `onnx` wheel's light
SqueezeNet with seeded weights and a variable batch dimension) and mlp.onnx (the e2e suite's
small MLP). Run with the e2e venv from the repository root: .venv/bin/python
scripts/batching-models.py DIR"""
import sys

sys.path.insert(0, "tests/e2e")
import gen_models  # noqa: E402
import onnx  # noqa: E402

m = gen_models.make_squeezenet_rw()
for v in list(m.graph.input) + list(m.graph.output):
    v.type.tensor_type.shape.dim[0].dim_param = "N"
onnx.save(m, sys.argv[1] + "/sq.onnx")
onnx.save(gen_models.make_mlp(), sys.argv[1] + "/mlp.onnx")
