//! The packer: from a plain ONNX file, or from a manifest directory, to a signed bundle.
//!
//! [`onnx_io`] reads a model's declared inputs and outputs straight from its protobuf (it does not
//! load or optimise the model), so the manifest of a packed ONNX file is written for the user.
//! [`pack_onnx`] and [`pack_dir`] read their files and hand the parts to
//! [`crate::bundle::pack_parts`]; this is the only module besides `keys` that touches the disk.

use crate::bundle::pack_parts;
use crate::error::{Error, Result};
use crate::manifest::{GraphEncoding, GraphSpec, Manifest, ModelInfo};
use crate::types::{Datatype, TensorSpec};
use ed25519_dalek::SigningKey;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType as OnnxType;

/// The manifest file a pack directory holds.
pub const MANIFEST_FILE: &str = "sophon.toml";
/// Graph name [`pack_onnx`] gives the model; the component loads it by this name.
pub const ONNX_GRAPH_NAME: &str = "model";
/// File name [`pack_onnx`] stores the model under.
pub const ONNX_GRAPH_FILE: &str = "model.onnx";

/// The graph inputs (leaving out initializers) and outputs of an ONNX model.
pub fn onnx_io(onnx_bytes: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>)> {
    let model = pb::ModelProto::decode(onnx_bytes)
        .map_err(|e| Error::Onnx(format!("not a valid ONNX protobuf ({e}): check the file")))?;
    let graph = model
        .graph
        .ok_or_else(|| Error::Onnx("the model has no graph: export it again".into()))?;
    let initializers: BTreeSet<&str> = graph
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .chain(
            graph
                .sparse_initializer
                .iter()
                .filter_map(|s| s.values.as_ref().map(|v| v.name.as_str())),
        )
        .collect();
    let inputs = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name.as_str()))
        .map(|v| tensor_spec("input", v))
        .collect::<Result<Vec<_>>>()?;
    let outputs = graph
        .output
        .iter()
        .map(|v| tensor_spec("output", v))
        .collect::<Result<Vec<_>>>()?;
    Ok((inputs, outputs))
}

/// A graph input whose values index a constant table (an ONNX `Gather` on an initializer).
///
/// tract's Gather does not bounds-check its indices: an id past the table reads another row or
/// panics. The node checks these inputs' values against `bound` before it runs the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexInput {
    /// The graph input that holds the indices.
    pub input: String,
    /// Indices must lie in `-bound..bound` (ONNX allows negative indices from the end).
    pub bound: u64,
    /// The Gather node, for error messages.
    pub node: String,
}

/// Ops that pass an input's values through unchanged (so indices keep their meaning).
const VALUE_PRESERVING: [&str; 7] = [
    "Cast",
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
];

/// The graph inputs that reach a `Gather` on a constant as its indices, directly or through
/// value-preserving ops, with the size of the gathered axis.
pub fn gather_index_inputs(onnx_bytes: &[u8]) -> Result<Vec<IndexInput>> {
    let model = pb::ModelProto::decode(onnx_bytes)
        .map_err(|e| Error::Onnx(format!("not a valid ONNX protobuf ({e}): check the file")))?;
    let Some(graph) = model.graph else {
        return Ok(Vec::new());
    };
    let mut constants: BTreeMap<&str, Vec<i64>> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.clone()))
        .collect();
    for node in &graph.node {
        if node.op_type == "Constant"
            && let (Some(out), Some(t)) = (
                node.output.first(),
                node.attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref()),
            )
        {
            constants.insert(out.as_str(), t.dims.clone());
        }
    }
    let inputs: BTreeSet<&str> = graph
        .input
        .iter()
        .map(|v| v.name.as_str())
        .filter(|n| !constants.contains_key(n))
        .collect();
    // Which graph input a value comes from unchanged, if any.
    let mut origin: BTreeMap<&str, &str> = inputs.iter().map(|n| (*n, *n)).collect();
    let mut found = Vec::new();
    // ONNX requires nodes in topological order, so one pass sees every producer first.
    for node in &graph.node {
        if VALUE_PRESERVING.contains(&node.op_type.as_str())
            && let (Some(src), Some(out)) = (node.input.first(), node.output.first())
            && let Some(input) = origin.get(src.as_str()).copied()
        {
            origin.insert(out.as_str(), input);
        }
        if node.op_type != "Gather" || !(node.domain.is_empty() || node.domain == "ai.onnx") {
            continue;
        }
        let (Some(data), Some(indices)) = (node.input.first(), node.input.get(1)) else {
            continue;
        };
        let (Some(dims), Some(input)) = (
            constants.get(data.as_str()),
            origin.get(indices.as_str()).copied(),
        ) else {
            continue;
        };
        let axis = node
            .attribute
            .iter()
            .find(|a| a.name == "axis")
            .map_or(0, |a| a.i);
        let rank = dims.len() as i64;
        let axis = if axis < 0 { axis + rank } else { axis };
        let Some(&size) = usize::try_from(axis).ok().and_then(|a| dims.get(a)) else {
            continue;
        };
        found.push(IndexInput {
            input: input.to_string(),
            bound: size.max(0) as u64,
            node: if node.name.is_empty() {
                format!("Gather on `{data}`")
            } else {
                node.name.clone()
            },
        });
    }
    Ok(found)
}

fn tensor_spec(kind: &str, value: &pb::ValueInfoProto) -> Result<TensorSpec> {
    let name = &value.name;
    let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(pb::type_proto::Value::TensorType(tensor)) => tensor,
        None => {
            return Err(Error::Onnx(format!(
                "{kind} `{name}` is not a tensor (sequence, map and optional values are not \
                 supported): export the model with plain tensor {kind}s"
            )));
        }
    };
    let datatype = datatype(tensor.elem_type).ok_or_else(|| {
        let type_name = OnnxType::try_from(tensor.elem_type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| format!("#{}", tensor.elem_type));
        Error::Onnx(format!(
            "{kind} `{name}` has element type {type_name}, which has no V2 datatype: \
             convert the model to a supported type"
        ))
    })?;
    let shape = tensor
        .shape
        .as_ref()
        .ok_or_else(|| {
            Error::Onnx(format!(
                "{kind} `{name}` has no shape (unknown rank): give it one in the model, \
                 or write a sophon.toml by hand"
            ))
        })?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n >= 0 => n,
            _ => -1,
        })
        .collect();
    Ok(TensorSpec {
        name: name.clone(),
        datatype,
        shape,
    })
}

/// The V2 datatype of an ONNX element type, if it has one.
pub fn datatype(elem_type: i32) -> Option<Datatype> {
    Some(match OnnxType::try_from(elem_type).ok()? {
        OnnxType::Float => Datatype::Fp32,
        OnnxType::Uint8 => Datatype::Uint8,
        OnnxType::Int8 => Datatype::Int8,
        OnnxType::Uint16 => Datatype::Uint16,
        OnnxType::Int16 => Datatype::Int16,
        OnnxType::Int32 => Datatype::Int32,
        OnnxType::Int64 => Datatype::Int64,
        OnnxType::String => Datatype::Bytes,
        OnnxType::Bool => Datatype::Bool,
        OnnxType::Float16 => Datatype::Fp16,
        OnnxType::Double => Datatype::Fp64,
        OnnxType::Uint32 => Datatype::Uint32,
        OnnxType::Uint64 => Datatype::Uint64,
        OnnxType::Bfloat16 => Datatype::Bf16,
        _ => return None,
    })
}

/// The manifest [`pack_onnx`] writes for a model: its inputs and outputs, one ONNX graph named
/// `model` in `model.onnx` analysed with the inputs' shapes, and default resources.
pub fn onnx_manifest(onnx_bytes: &[u8], name: &str, version: &str) -> Result<Manifest> {
    onnx_manifest_with(onnx_bytes, name, version, &OnnxOptions::default())
}

/// How [`pack_onnx_with`] packs a model beyond its file: input dimensions pinned, the backends
/// named, and the backends a pack-time check loaded it on.
#[derive(Clone, Debug, Default)]
pub struct OnnxOptions {
    /// Input name → dims, -1 leaving a dimension as the model declares it (perf_analyzer's
    /// `--shape`).
    pub pins: BTreeMap<String, Vec<i64>>,
    /// The backends to run it on, best first (empty: the node's order).
    pub backends: Vec<crate::manifest::Backend>,
    /// The backends that loaded the graph where it was packed (empty: not checked).
    pub loads_on: Vec<crate::manifest::Backend>,
    /// The devices it prefers, best first (empty: the CPU).
    pub preferred: Vec<crate::manifest::Device>,
    /// GPU memory it needs (MiB; 0: what the load takes).
    pub min_gpu_memory_mb: u64,
    /// Threads per request in the native backends (0: the node's default).
    pub threads: u32,
    /// The model's `max_batch_size`: `None` detects it (see [`detect_batch`]), `Some(0)` says
    /// the model does not batch.
    pub max_batch_size: Option<u32>,
    /// Dynamic batching to write into the manifest (`[batching]`).
    pub batching: Option<crate::manifest::Batching>,
    /// Class names for outputs (Triton's classification extension), by output name: the
    /// text of a labels file, one name per line. Packed as `labels/output<i>.txt`, `i` the
    /// output's place among the model's outputs.
    pub labels: BTreeMap<String, Vec<u8>>,
}

/// Add `options.labels` to a manifest and its files, as `labels/output<i>.txt`.
pub fn add_labels(
    manifest: &mut Manifest,
    files: &mut Vec<(String, Vec<u8>)>,
    options: &OnnxOptions,
) {
    for (output, text) in &options.labels {
        // By the output's place, not its name, which may hold characters a file name may not
        // (`dense/Softmax:0`); an output the model lacks is refused when the manifest is checked.
        let file = match manifest.outputs.iter().position(|o| &o.name == output) {
            Some(i) => format!("labels/output{i}.txt"),
            None => format!(
                "labels/{}.txt",
                output.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            ),
        };
        manifest.labels.insert(output.clone(), file.clone());
        files.push((file, text.clone()));
    }
}

/// The `max_batch_size` packing gives a model whose inputs and outputs all lead with a variable
/// dimension, when none is asked for.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 1024;

/// Whether a model batches, the way Triton's auto-complete decides it: every input and every
/// output has a variable leading dimension (after the pins). Those are the batch.
pub fn detect_batch(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> bool {
    inputs
        .iter()
        .chain(outputs)
        .all(|t| t.shape.first() == Some(&-1))
}

/// [`onnx_manifest`] with [`OnnxOptions`]. A pinned input takes requests of that shape only,
/// and the node analyses the graph with it, which lets graphs whose variable dimensions tract
/// cannot reason about load as fixed ones.
pub fn onnx_manifest_with(
    onnx_bytes: &[u8],
    name: &str,
    version: &str,
    options: &OnnxOptions,
) -> Result<Manifest> {
    let (inputs, outputs) = onnx_io(onnx_bytes)?;
    let graph = GraphSpec {
        name: ONNX_GRAPH_NAME.to_string(),
        file: ONNX_GRAPH_FILE.to_string(),
        encoding: GraphEncoding::Onnx,
        shapes: BTreeMap::new(),
        weights: None,
    };
    graph_manifest(inputs, outputs, graph, name, version, options)
}

/// The manifest of a model whose graph (`graph`, named `model` for the passthrough component)
/// takes `inputs` and gives `outputs`: the pins applied, the graph analysed with the inputs'
/// shapes, and default resources.
pub fn graph_manifest(
    mut inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    mut graph: GraphSpec,
    name: &str,
    version: &str,
    options: &OnnxOptions,
) -> Result<Manifest> {
    for (input, pin) in &options.pins {
        let names: Vec<String> = inputs.iter().map(|i| i.name.clone()).collect();
        let spec = inputs
            .iter_mut()
            .find(|i| i.name == *input)
            .ok_or_else(|| {
                Error::Onnx(format!(
                    "--shape names input `{input}`, but the model's inputs are {names:?}"
                ))
            })?;
        if pin.len() != spec.shape.len() {
            return Err(Error::Onnx(format!(
                "--shape gives input `{input}` {} dimensions, but the model declares {} ({:?})",
                pin.len(),
                spec.shape.len(),
                spec.shape
            )));
        }
        for (axis, (declared, pinned)) in spec.shape.iter_mut().zip(pin).enumerate() {
            match (*declared, *pinned) {
                (_, -1) => {}
                (-1, p) if p >= 0 => *declared = p,
                (d, p) if d == p => {}
                (d, p) => {
                    return Err(Error::Onnx(format!(
                        "--shape pins dimension {axis} of input `{input}` to {p}, but the model \
                         fixes it at {d}: pin only variable dimensions (-1 keeps one as it is)"
                    )));
                }
            }
        }
    }
    graph.shapes = inputs
        .iter()
        .map(|i| (i.name.clone(), i.shape.clone()))
        .collect();
    let mut manifest = Manifest {
        model: ModelInfo {
            name: name.to_string(),
            version: version.to_string(),
            description: None,
        },
        inputs,
        outputs,
        graphs: vec![graph],
        ..Manifest::default()
    };
    manifest.hardware.backends = options.backends.clone();
    if !options.preferred.is_empty() {
        manifest.hardware.preferred = options.preferred.clone();
    }
    manifest.hardware.min_gpu_memory_mb = options.min_gpu_memory_mb;
    manifest.resources.threads = options.threads;
    manifest.resources.max_batch_size = match options.max_batch_size {
        Some(n) => n,
        None if detect_batch(&manifest.inputs, &manifest.outputs) => DEFAULT_MAX_BATCH_SIZE,
        None => 0,
    };
    if manifest.resources.max_batch_size > 0 && !detect_batch(&manifest.inputs, &manifest.outputs) {
        return Err(Error::Onnx(format!(
            "max_batch_size {} needs every input and output to lead with a variable (batch) \
             dimension; this model's are {:?} and {:?}",
            manifest.resources.max_batch_size,
            manifest
                .inputs
                .iter()
                .map(|t| (&t.name, &t.shape))
                .collect::<Vec<_>>(),
            manifest
                .outputs
                .iter()
                .map(|t| (&t.name, &t.shape))
                .collect::<Vec<_>>(),
        )));
    }
    manifest.batching = options.batching.clone();
    manifest.hardware.loads_on = options.loads_on.clone();
    manifest.validate()?;
    Ok(manifest)
}

/// Packs a plain ONNX model with a passthrough component (one that feeds its inputs to the graph
/// `model` and returns the graph's outputs) into a signed bundle.
pub fn pack_onnx(
    onnx_bytes: &[u8],
    name: &str,
    version: &str,
    passthrough_component: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>> {
    pack_onnx_with(
        onnx_bytes,
        name,
        version,
        passthrough_component,
        key,
        &OnnxOptions::default(),
    )
}

/// [`pack_onnx`] with [`OnnxOptions`] (see [`onnx_manifest_with`]).
pub fn pack_onnx_with(
    onnx_bytes: &[u8],
    name: &str,
    version: &str,
    passthrough_component: &[u8],
    key: &SigningKey,
    options: &OnnxOptions,
) -> Result<Vec<u8>> {
    let mut manifest = onnx_manifest_with(onnx_bytes, name, version, options)?;
    let mut files = vec![(ONNX_GRAPH_FILE.to_string(), onnx_bytes.to_vec())];
    add_labels(&mut manifest, &mut files, options);
    pack_parts(&manifest, passthrough_component, &files, key)
}

/// Packs a directory holding `sophon.toml`, the component and the graph files it names.
pub fn pack_dir(dir: &Path, key: &SigningKey) -> Result<Vec<u8>> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
    let manifest = Manifest::from_toml(&text).map_err(|e| match e {
        Error::Manifest(message) => {
            Error::Manifest(format!("{}: {message}", manifest_path.display()))
        }
        other => other,
    })?;
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| Error::io(path, e))
    };
    let component = read(&manifest.component.file)?;
    let mut files = BTreeMap::new();
    for file in manifest.files() {
        files.insert(file.to_string(), read(file)?);
    }
    let files: Vec<(String, Vec<u8>)> = files.into_iter().collect();
    pack_parts(&manifest, &component, &files, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Bundle;
    use crate::examples::mlp_onnx;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    fn value(name: &str, r#type: Option<pb::type_proto::Value>) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: r#type,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn tensor(
        elem: OnnxType,
        dims: Option<Vec<pb::tensor_shape_proto::Dimension>>,
    ) -> pb::type_proto::Value {
        pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: elem as i32,
            shape: dims.map(|dim| pb::TensorShapeProto { dim }),
        })
    }

    fn model(inputs: Vec<pb::ValueInfoProto>, outputs: Vec<pb::ValueInfoProto>) -> Vec<u8> {
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                input: inputs,
                output: outputs,
                initializer: vec![pb::TensorProto {
                    name: "weights".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn dim(
        value: Option<pb::tensor_shape_proto::dimension::Value>,
    ) -> pb::tensor_shape_proto::Dimension {
        pb::tensor_shape_proto::Dimension {
            value,
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_generated_mlp() {
        let (inputs, outputs) = onnx_io(&mlp_onnx(784, 32, 10, 1)).expect("io");
        assert_eq!(
            inputs,
            vec![TensorSpec {
                name: "input".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 784],
            }]
        );
        assert_eq!(
            outputs,
            vec![TensorSpec {
                name: "output".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 10],
            }]
        );
    }

    #[test]
    fn initializers_are_not_inputs_and_dims_map() {
        use pb::tensor_shape_proto::dimension::Value;
        let bytes = model(
            vec![
                value(
                    "ids",
                    Some(tensor(
                        OnnxType::Int64,
                        Some(vec![
                            dim(Some(Value::DimParam("n".into()))),
                            dim(None),
                            dim(Some(Value::DimValue(3))),
                        ]),
                    )),
                ),
                value("weights", Some(tensor(OnnxType::Float, Some(vec![])))),
            ],
            vec![value(
                "text",
                Some(tensor(
                    OnnxType::String,
                    Some(vec![dim(Some(Value::DimValue(-5)))]),
                )),
            )],
        );
        let (inputs, outputs) = onnx_io(&bytes).expect("io");
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].datatype, Datatype::Int64);
        assert_eq!(inputs[0].shape, vec![-1, -1, 3]);
        assert_eq!(outputs[0].datatype, Datatype::Bytes);
        assert_eq!(outputs[0].shape, vec![-1]);
    }

    #[test]
    fn every_supported_elem_type_maps() {
        let pairs = [
            (OnnxType::Float, Datatype::Fp32),
            (OnnxType::Uint8, Datatype::Uint8),
            (OnnxType::Int8, Datatype::Int8),
            (OnnxType::Uint16, Datatype::Uint16),
            (OnnxType::Int16, Datatype::Int16),
            (OnnxType::Int32, Datatype::Int32),
            (OnnxType::Int64, Datatype::Int64),
            (OnnxType::String, Datatype::Bytes),
            (OnnxType::Bool, Datatype::Bool),
            (OnnxType::Float16, Datatype::Fp16),
            (OnnxType::Double, Datatype::Fp64),
            (OnnxType::Uint32, Datatype::Uint32),
            (OnnxType::Uint64, Datatype::Uint64),
            (OnnxType::Bfloat16, Datatype::Bf16),
        ];
        for (onnx, v2) in pairs {
            assert_eq!(datatype(onnx as i32), Some(v2), "{onnx:?}");
        }
        assert_eq!(datatype(OnnxType::Complex64 as i32), None);
        assert_eq!(datatype(9999), None);
    }

    #[test]
    fn unsupported_values_are_named() {
        let f = || Some(tensor(OnnxType::Float, Some(vec![])));
        let e =
            onnx_io(&model(vec![value("x", f())], vec![value("scores", None)])).expect_err("map");
        assert!(
            e.to_string().contains("output `scores` is not a tensor"),
            "{e}"
        );
        let e = onnx_io(&model(
            vec![value("z", Some(tensor(OnnxType::Complex64, Some(vec![]))))],
            vec![value("y", f())],
        ))
        .expect_err("complex");
        assert!(e.to_string().contains("input `z`"), "{e}");
        assert!(e.to_string().contains("COMPLEX64"), "{e}");
        let e = onnx_io(&model(
            vec![value("r", Some(tensor(OnnxType::Float, None)))],
            vec![],
        ))
        .expect_err("rank");
        assert!(e.to_string().contains("input `r` has no shape"), "{e}");
        let e = onnx_io(b"\xff\xff\xff").expect_err("garbage");
        assert!(e.to_string().contains("not a valid ONNX"), "{e}");
        let e = onnx_io(&pb::ModelProto::default().encode_to_vec()).expect_err("no graph");
        assert!(e.to_string().contains("no graph"), "{e}");
    }

    #[test]
    fn pack_onnx_writes_a_readable_bundle() {
        let onnx = mlp_onnx(4, 8, 2, 5);
        let bytes = pack_onnx(&onnx, "mlp", "2", b"passthrough", &key()).expect("pack");
        let bundle = Bundle::read(&bytes).expect("read");
        assert_eq!(bundle.manifest.model.name, "mlp");
        assert_eq!(bundle.manifest.model.version, "2");
        assert_eq!(bundle.manifest.inputs[0].shape, vec![-1, 4]);
        // Every input and output leads with a variable dimension: that is the batch.
        assert_eq!(
            bundle.manifest.resources.max_batch_size,
            DEFAULT_MAX_BATCH_SIZE
        );
        assert_eq!(bundle.component, b"passthrough");
        let graph = &bundle.manifest.graphs[0];
        assert_eq!(
            (graph.name.as_str(), graph.file.as_str()),
            ("model", "model.onnx")
        );
        assert_eq!(bundle.graph_bytes(graph).expect("graph"), &onnx[..]);
        let e = pack_onnx(&onnx, "bad name", "1", b"", &key()).expect_err("name");
        assert!(e.to_string().contains("model name"), "{e}");
    }

    #[test]
    fn pack_dir_reads_the_manifest_and_its_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = r#"
[model]
name = "mnist"
version = "1"
[component]
file = "build/app.wasm"
[[inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 784]
[[outputs]]
name = "output"
datatype = "FP32"
shape = [-1, 10]
[[graphs]]
name = "model"
file = "model.onnx"
encoding = "onnx"
[capabilities]
env = { LABELS = "a,b,c" }
"#;
        std::fs::write(dir.path().join(MANIFEST_FILE), manifest).expect("write");
        std::fs::create_dir(dir.path().join("build")).expect("mkdir");
        std::fs::write(dir.path().join("build/app.wasm"), b"wasm").expect("write");
        let e = pack_dir(dir.path(), &key()).expect_err("model missing");
        assert!(e.to_string().contains("model.onnx"), "{e}");
        std::fs::write(dir.path().join("model.onnx"), b"onnx").expect("write");
        let bundle = Bundle::read(&pack_dir(dir.path(), &key()).expect("pack")).expect("read");
        assert_eq!(bundle.component, b"wasm");
        assert_eq!(bundle.files["model.onnx"], b"onnx");
        assert_eq!(bundle.manifest.capabilities.env["LABELS"], "a,b,c");

        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            manifest.replace("model.onnx", "../x"),
        )
        .expect("write");
        let e = pack_dir(dir.path(), &key()).expect_err("escape");
        assert!(e.to_string().contains("sophon.toml"), "{e}");
        let e = pack_dir(&dir.path().join("nope"), &key()).expect_err("no dir");
        assert!(e.to_string().contains("sophon.toml"), "{e}");
    }
}
