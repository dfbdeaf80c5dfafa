//! Example models generated in Rust, for tests, demos and benchmarks: no Python, no checked-in
//! binaries, the same bytes for the same arguments on every machine.
//!
//! [`Mlp`] is a two-layer perceptron, `output = Gemm(Relu(Gemm(input, w1, b1)), w2, b2)`, with a
//! symbolic batch dimension. [`Mlp::to_onnx`] writes it as an ONNX model (opset 13, IR version 8)
//! and [`Mlp::forward`] computes the same function in plain Rust, so a test can check a runtime's
//! answers against it.

use prost::Message;
use tract_onnx::pb;

/// ONNX opset the examples use.
pub const OPSET: i64 = 13;
/// ONNX IR version the examples use.
pub const IR_VERSION: i64 = 8;

/// A two-layer perceptron with deterministic Xavier-uniform weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
    /// `[input, hidden]`, row-major.
    pub w1: Vec<f32>,
    /// `[hidden]`.
    pub b1: Vec<f32>,
    /// `[hidden, output]`, row-major.
    pub w2: Vec<f32>,
    /// `[output]`.
    pub b2: Vec<f32>,
}

/// The ONNX bytes of `Mlp::new(input, hidden, output, seed)`.
pub fn mlp_onnx(input: usize, hidden: usize, output: usize, seed: u64) -> Vec<u8> {
    Mlp::new(input, hidden, output, seed).to_onnx()
}

impl Mlp {
    /// Weights drawn from `seed`. Sizes of 0 are taken as 1.
    pub fn new(input: usize, hidden: usize, output: usize, seed: u64) -> Mlp {
        let (input, hidden, output) = (input.max(1), hidden.max(1), output.max(1));
        let mut rng = SplitMix64(seed);
        let xavier = |rng: &mut SplitMix64, fan_in: usize, fan_out: usize, n: usize| {
            let limit = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
            (0..n)
                .map(|_| rng.next_symmetric() * limit)
                .collect::<Vec<f32>>()
        };
        let bias = |rng: &mut SplitMix64, n: usize| {
            (0..n)
                .map(|_| rng.next_symmetric() * 0.1)
                .collect::<Vec<f32>>()
        };
        let w1 = xavier(&mut rng, input, hidden, input * hidden);
        let b1 = bias(&mut rng, hidden);
        let w2 = xavier(&mut rng, hidden, output, hidden * output);
        let b2 = bias(&mut rng, output);
        Mlp {
            input,
            hidden,
            output,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The forward pass over a row-major `[n, input]` batch, giving `[n, output]`. A trailing
    /// partial row is ignored.
    pub fn forward(&self, batch: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(batch.len() / self.input * self.output);
        let mut hidden = vec![0f32; self.hidden];
        for row in batch.chunks_exact(self.input) {
            for (h, value) in hidden.iter_mut().enumerate() {
                let sum: f32 = row
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x * self.w1[i * self.hidden + h])
                    .sum();
                *value = (sum + self.b1[h]).max(0.0);
            }
            for o in 0..self.output {
                let sum: f32 = hidden
                    .iter()
                    .enumerate()
                    .map(|(h, x)| x * self.w2[h * self.output + o])
                    .sum();
                out.push(sum + self.b2[o]);
            }
        }
        out
    }

    /// The model as ONNX: input `input` FP32 `[batch, input]`, output `output` FP32
    /// `[batch, output]`, where `batch` is symbolic.
    pub fn to_onnx(&self) -> Vec<u8> {
        let graph = pb::GraphProto {
            name: "mlp".into(),
            node: vec![
                node("Gemm", &["input", "w1", "b1"], "hidden_pre", "gemm1"),
                node("Relu", &["hidden_pre"], "hidden", "relu"),
                node("Gemm", &["hidden", "w2", "b2"], "output", "gemm2"),
            ],
            initializer: vec![
                initializer("w1", &[self.input, self.hidden], &self.w1),
                initializer("b1", &[self.hidden], &self.b1),
                initializer("w2", &[self.hidden, self.output], &self.w2),
                initializer("b2", &[self.output], &self.b2),
            ],
            input: vec![batch_value("input", self.input)],
            output: vec![batch_value("output", self.output)],
            ..Default::default()
        };
        let model = pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "sophon-sdk".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            ..Default::default()
        };
        model.encode_to_vec()
    }
}

/// Two FP32 inputs `a` and `b` of shape `[batch, width]` (one symbolic `batch`), output
/// `sum = a + b`. Requests whose `a` and `b` disagree on `batch` pass the manifest's checks but
/// cannot run: the graph says they are the same size.
pub fn add_onnx(width: usize) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "add".into(),
        node: vec![node("Add", &["a", "b"], "sum", "add")],
        input: vec![batch_value("a", width), batch_value("b", width)],
        output: vec![batch_value("sum", width)],
        ..Default::default()
    };
    model_bytes(graph)
}

/// One FP32 input `x` of shape `[batch, width]` through `Frobnicate`, an operator that no ONNX
/// runtime implements: a model file every backend refuses at load.
pub fn unsupported_onnx(width: usize) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "unsupported".into(),
        node: vec![node("Frobnicate", &["x"], "y", "frob")],
        input: vec![batch_value("x", width)],
        output: vec![batch_value("y", width)],
        ..Default::default()
    };
    model_bytes(graph)
}

/// An embedding table of `rows` × `dim` (row `i` holds `i` in every column): INT64 `ids` of
/// shape `[n]` in, FP32 `vectors` of shape `[n, dim]` out, through a `Gather` on the table.
/// With `summed`, the ids are the sum of two inputs `a` and `b`, which hides them from a check
/// that follows graph inputs into the Gather.
pub fn embedding_onnx(rows: usize, dim: usize, summed: bool) -> Vec<u8> {
    use pb::tensor_proto::DataType;
    let table: Vec<f32> = (0..rows * dim).map(|i| (i / dim) as f32).collect();
    let (mut nodes, inputs) = if summed {
        (
            vec![node("Add", &["a", "b"], "ids", "add")],
            vec![
                value("a", DataType::Int64, &[None]),
                value("b", DataType::Int64, &[None]),
            ],
        )
    } else {
        (Vec::new(), vec![value("ids", DataType::Int64, &[None])])
    };
    nodes.push(node("Gather", &["table", "ids"], "vectors", "embed"));
    let graph = pb::GraphProto {
        name: "embedding".into(),
        node: nodes,
        initializer: vec![initializer("table", &[rows, dim], &table)],
        input: inputs,
        output: vec![value("vectors", DataType::Float, &[None, Some(dim)])],
        ..Default::default()
    };
    model_bytes(graph)
}

/// `y = Identity(x)` on a tensor of ONNX element type `elem_type` (the `TensorProto.DataType`
/// number) and shape `[n]`: what a tensor of each datatype looks like after a round trip.
pub fn identity_onnx(elem_type: i32) -> Vec<u8> {
    let elem = pb::tensor_proto::DataType::try_from(elem_type)
        .unwrap_or(pb::tensor_proto::DataType::Undefined);
    let graph = pb::GraphProto {
        name: "identity".into(),
        node: vec![node("Identity", &["x"], "y", "identity")],
        input: vec![value("x", elem, &[None])],
        output: vec![value("y", elem, &[None])],
        ..Default::default()
    };
    model_bytes(graph)
}

fn model_bytes(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "sophon-sdk".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A tensor value; `None` dims are the symbolic `n`.
fn value(
    name: &str,
    elem: pb::tensor_proto::DataType,
    dims: &[Option<usize>],
) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dims = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => Value::DimValue(*n as i64),
                None => Value::DimParam("n".into()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str, name: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: name.into(),
        ..Default::default()
    }
}

fn initializer(name: &str, dims: &[usize], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

/// A FLOAT tensor value of shape `[batch, width]`.
fn batch_value(name: &str, width: usize) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    let dims = vec![
        Dimension {
            value: Some(Value::DimParam("batch".into())),
            ..Default::default()
        },
        Dimension {
            value: Some(Value::DimValue(width as i64)),
            ..Default::default()
        },
    ];
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// SplitMix64, the small PRNG the weights come from.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(mlp_onnx(4, 8, 3, 7), mlp_onnx(4, 8, 3, 7));
        assert_ne!(mlp_onnx(4, 8, 3, 7), mlp_onnx(4, 8, 3, 8));
        let mlp = Mlp::new(784, 64, 10, 1);
        let limit = (6.0f32 / (784.0 + 64.0)).sqrt();
        assert!(mlp.w1.iter().all(|w| w.abs() <= limit));
        assert!(mlp.w1.iter().any(|w| *w < 0.0) && mlp.w1.iter().any(|w| *w > 0.0));
    }

    #[test]
    fn forward_pass_by_hand() {
        let mlp = Mlp {
            input: 2,
            hidden: 2,
            output: 1,
            w1: vec![1.0, -1.0, 2.0, 1.0],
            b1: vec![0.5, 0.0],
            w2: vec![1.0, 3.0],
            b2: vec![-1.0],
        };
        // x = [1, 1]: hidden = relu([1 + 2 + 0.5, -1 + 1]) = [3.5, 0]; out = 3.5 - 1.
        // x = [0, -1]: hidden = relu([-2 + 0.5, -1]) = [0, 0]; out = -1.
        assert_eq!(mlp.forward(&[1.0, 1.0, 0.0, -1.0]), vec![2.5, -1.0]);
    }

    #[test]
    fn tract_runs_the_model_like_the_reference() -> TractResult<()> {
        let mlp = Mlp::new(5, 16, 3, 42);
        let bytes = mlp.to_onnx();
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])?
            .into_optimized()?
            .into_runnable()?;
        let mut rng = SplitMix64(99);
        for batch in [1usize, 3] {
            let x: Vec<f32> = (0..batch * 5).map(|_| rng.next_symmetric() * 2.0).collect();
            let input = Tensor::from_shape(&[batch, 5], &x)?;
            let outputs = model.run(tvec!(input.into()))?;
            let view = outputs[0].to_plain_array_view::<f32>()?;
            assert_eq!(view.shape(), &[batch, 3]);
            let expected = mlp.forward(&x);
            for (got, want) in view.iter().zip(&expected) {
                assert!((got - want).abs() < 1e-5, "batch {batch}: {got} vs {want}");
            }
            assert_eq!(view.len(), expected.len());
        }
        Ok(())
    }
}
