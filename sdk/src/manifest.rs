//! The bundle manifest: what the model is called, its component, its declared inputs and outputs,
//! the model files the node preloads as wasi-nn named graphs, and what the sandbox may use.
//!
//! A manifest is read once from TOML (`sophon.toml` beside the files when packing, `manifest.toml`
//! inside a bundle) and checked with [`Manifest::validate`]; nothing downstream re-checks it. File
//! names in it are plain relative paths, so they can never point outside the directory or bundle.

use crate::error::{Error, Result};
use crate::types::{Datatype, TensorSpec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Longest model name or version.
pub const MAX_NAME_LEN: usize = 64;
/// Longest file path (component or graph file) a manifest may name.
pub const MAX_FILE_LEN: usize = 200;
/// Most graphs one manifest may declare.
pub const MAX_GRAPHS: usize = 256;
/// Most inputs, and most outputs, one manifest may declare.
pub const MAX_TENSORS: usize = 1024;
/// Most dimensions of a shape a graph is analysed with.
pub const MAX_RANK: usize = 16;

/// The largest labels file (`[labels]`).
pub const MAX_LABELS_BYTES: usize = 16 << 20;
/// The most class names one labels file holds.
pub const MAX_LABELS: usize = 1 << 20;

/// The class names of a labels file: UTF-8 text, one name per line (trailing spaces and `\r`
/// dropped), at most [`MAX_LABELS_BYTES`] and [`MAX_LABELS`] lines.
pub fn parse_labels(text: &[u8]) -> Result<Vec<String>> {
    if text.len() > MAX_LABELS_BYTES {
        return Err(invalid(format!(
            "a labels file of {} bytes is over the limit of {MAX_LABELS_BYTES}",
            text.len()
        )));
    }
    let text = std::str::from_utf8(text)
        .map_err(|e| invalid(format!("a labels file is not UTF-8 text: {e}")))?;
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "a labels file of {} lines is over the limit of {MAX_LABELS} classes",
            labels.len()
        )));
    }
    Ok(labels)
}

/// A model's manifest (`sophon.toml` / `manifest.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub model: ModelInfo,
    pub component: ComponentSpec,
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
    #[serde(default)]
    pub graphs: Vec<GraphSpec>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub hardware: Hardware,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Dynamic batching; absent: each request runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    /// `[labels]`: class names for Triton's classification extension, by output name: a text
    /// file in the bundle with one name per line, line `i` naming class `i` (Triton's
    /// `label_filename`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `[model]`: the model's name and version, `[a-zA-Z0-9_.-]{1,64}` each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `[component]`: the Wasm component that serves the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentSpec {
    /// Path of the component, relative to the manifest's directory.
    pub file: String,
}

impl Default for ComponentSpec {
    fn default() -> Self {
        ComponentSpec {
            file: "component.wasm".to_string(),
        }
    }
}

/// `[[graphs]]`: a model file the node preloads as a wasi-nn named graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    /// The name the guest passes to wasi-nn `load-by-name`.
    pub name: String,
    /// Path of the model file, relative to the manifest's directory.
    pub file: String,
    pub encoding: GraphEncoding,
    /// The shapes the node analyses the graph's inputs with, by input name: a size fixes a
    /// dimension, -1 leaves it variable. Inputs not named keep the shapes the file declares.
    /// `sophon pack --onnx` writes the model's inputs here, with the dimensions `--shape` pins.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shapes: BTreeMap<String, Vec<i64>>,
    /// OpenVINO IR: the weights file (`model.bin`) beside the XML that `file` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

impl GraphSpec {
    /// The files the graph is made of: `file`, and `weights` where it has one.
    pub fn files(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.file.as_str()).chain(self.weights.as_deref())
    }
}

/// How a graph file is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphEncoding {
    Onnx,
    Openvino,
}

/// `[resources]`: limits the node enforces on every instance of the component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Resources {
    /// Maximum linear memory per instance, in MiB (1..=65536).
    pub memory_mb: u32,
    /// Deadline for one inference call, in milliseconds (at least 1).
    pub timeout_ms: u64,
    /// Most calls in flight at once; 0 leaves it to the node.
    pub max_concurrency: u32,
    /// Greater than 0 means the first dimension of every tensor is a batch dimension.
    pub max_batch_size: u32,
    /// Threads one request of this model computes on, in the native backends (ONNX Runtime's
    /// intra-op threads, OpenVINO's threads per stream); 0 leaves it to the node (1). tract
    /// computes on the request's own thread.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub threads: u32,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_mb: 256,
            timeout_ms: 10_000,
            max_concurrency: 0,
            max_batch_size: 0,
            threads: 0,
        }
    }
}

/// Longest `max_queue_delay_us` a manifest may ask for (one second).
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;

/// `[batching]`: dynamic batching, as Triton's `dynamic_batching`. Requests wait at most
/// `max_queue_delay_us` for others whose shapes match; the node concatenates them along dim 0
/// into one call of the model and splits the outputs back. The model must batch
/// (`resources.max_batch_size` > 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Batching {
    /// The most rows one batch holds; 0: `resources.max_batch_size`, up to
    /// [`DEFAULT_BATCH_LIMIT`]. Never more than `resources.max_batch_size`.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub max_batch_size: u32,
    /// Batch sizes to cut at, when the queue holds requests that add up to one of them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preferred_batch_sizes: Vec<u32>,
    /// How long the oldest request waits for others, in microseconds (0: only those already
    /// waiting join it). At most one second.
    pub max_queue_delay_us: u64,
}

/// The most rows a batch holds when `[batching]` does not say: bigger batches of small requests
/// gain little more and hold every request in them for longer.
pub const DEFAULT_BATCH_LIMIT: u32 = 64;

impl Batching {
    /// The most rows one batch holds, given the model's `max_batch_size`.
    pub fn limit(&self, model_max: u32) -> u32 {
        match self.max_batch_size {
            0 => model_max.min(DEFAULT_BATCH_LIMIT),
            n => n.min(model_max),
        }
    }
}

/// A kind of device a model can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Gpu,
    Npu,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
            Device::Npu => "npu",
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "gpu" => Ok(Device::Gpu),
            "npu" => Ok(Device::Npu),
            other => Err(format!("unknown device `{other}`: use cpu, gpu or npu")),
        }
    }
}

/// `[hardware]`: the devices the model prefers, best first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hardware {
    pub preferred: Vec<Device>,
    /// The wasi-nn backends to try, best first (`tract`, `ort`). Empty: the node's order
    /// (tract, then ONNX Runtime where the node has it). The first that loads the graph runs it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// The backends that loaded the graphs where the bundle was packed (`sophon pack --onnx`
    /// checks). The coordinators place the model only on nodes with one of them. Empty: not
    /// checked, any node.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loads_on: Vec<Backend>,
    /// GPU memory the model needs (MiB). A node reserves it on a GPU before loading the model
    /// there, and runs the model elsewhere when no GPU has that much left. 0: the memory the
    /// load is seen to take.
    #[serde(skip_serializing_if = "is_zero")]
    pub min_gpu_memory_mb: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            preferred: vec![Device::Cpu],
            backends: Vec::new(),
            loads_on: Vec::new(),
            min_gpu_memory_mb: 0,
        }
    }
}

/// A wasi-nn backend a node may run a graph on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tract, pure Rust, on the CPU: every node has it.
    Tract,
    /// ONNX Runtime, loaded at run time where the node has its library.
    Ort,
    /// OpenVINO, loaded at run time where the node has its library (Intel CPU, GPU, NPU).
    Openvino,
    /// tract on an NVIDIA GPU (CUDA loaded at run time, where the node has it).
    #[serde(rename = "tract-cuda")]
    TractCuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Ort => "ort",
            Backend::Openvino => "openvino",
            Backend::TractCuda => "tract-cuda",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Backend, String> {
        match s {
            "tract" => Ok(Backend::Tract),
            "ort" | "onnxruntime" => Ok(Backend::Ort),
            "openvino" | "ov" => Ok(Backend::Openvino),
            "tract-cuda" | "cuda" => Ok(Backend::TractCuda),
            other => Err(format!(
                "unknown backend `{other}`: use tract, ort, openvino or tract-cuda"
            )),
        }
    }
}

/// `[capabilities]`: what the Wasm sandbox is granted. Nothing by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Capabilities {
    /// Environment variables the component sees.
    pub env: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses and validates a manifest from TOML.
    pub fn from_toml(text: &str) -> Result<Manifest> {
        let manifest: Manifest = toml::from_str(text)
            .map_err(|e| Error::Manifest(e.to_string().trim_end().to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serialises the manifest to TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::Manifest(format!("cannot write as toml: {e}")))
    }

    /// Checks everything the node relies on; see the module page.
    /// Every model file the bundle holds: the graphs' files, then the label files, each once.
    pub fn files(&self) -> Vec<&str> {
        let mut files: Vec<&str> = Vec::new();
        let named = self
            .graphs
            .iter()
            .flat_map(GraphSpec::files)
            .chain(self.labels.values().map(String::as_str));
        for file in named {
            if !files.contains(&file) {
                files.push(file);
            }
        }
        files
    }

    pub fn validate(&self) -> Result<()> {
        check_id("model name", &self.model.name)?;
        check_id("model version", &self.model.version)?;
        check_file("component file", &self.component.file)?;
        check_tensors("input", &self.inputs)?;
        check_tensors("output", &self.outputs)?;
        for (output, file) in &self.labels {
            let Some(spec) = self.outputs.iter().find(|o| &o.name == output) else {
                return Err(invalid(format!(
                    "[labels] names output `{output}`, which the manifest does not declare"
                )));
            };
            if matches!(spec.datatype, Datatype::Bool | Datatype::Bytes) {
                return Err(invalid(format!(
                    "[labels] names output `{output}`, a {} output: labels name the classes of \
                     a numeric output",
                    spec.datatype
                )));
            }
            check_file(&format!("output `{output}` labels"), file)?;
            if self.graphs.iter().any(|g| g.files().any(|f| f == file)) {
                return Err(invalid(format!(
                    "output `{output}` labels {file:?} is also a graph's file: give the labels \
                     a file of their own"
                )));
            }
        }
        if self.graphs.len() > MAX_GRAPHS {
            return Err(invalid(format!(
                "{} graphs declared, at most {MAX_GRAPHS} are allowed",
                self.graphs.len()
            )));
        }
        let mut graph_names = BTreeSet::new();
        for graph in &self.graphs {
            if graph.name.is_empty() {
                return Err(invalid(
                    "a graph has an empty name: give every [[graphs]] a name",
                ));
            }
            if !graph_names.insert(graph.name.as_str()) {
                return Err(invalid(format!(
                    "graph `{}` is declared twice: graph names must be unique",
                    graph.name
                )));
            }
            check_file(&format!("graph `{}` file", graph.name), &graph.file)?;
            if let Some(weights) = &graph.weights {
                check_file(&format!("graph `{}` weights", graph.name), weights)?;
            }
            for (input, shape) in &graph.shapes {
                if input.is_empty() || shape.len() > MAX_RANK {
                    return Err(invalid(format!(
                        "graph `{}` shapes: input `{input}` needs a name and at most {MAX_RANK} \
                         dimensions",
                        graph.name
                    )));
                }
                if let Some(dim) = shape.iter().find(|d| **d < -1) {
                    return Err(invalid(format!(
                        "graph `{}` shapes: input `{input}` has dimension {dim}: use a size >= 0, \
                         or -1 for a variable dimension",
                        graph.name
                    )));
                }
            }
        }
        let r = &self.resources;
        if !(1..=65_536).contains(&r.memory_mb) {
            return Err(invalid(format!(
                "resources.memory_mb = {} is out of range: use 1 to 65536",
                r.memory_mb
            )));
        }
        if r.timeout_ms == 0 {
            return Err(invalid("resources.timeout_ms = 0: use at least 1"));
        }
        if r.threads > 256 {
            return Err(invalid(format!(
                "resources.threads = {} is out of range: use 0 (the node's default) to 256",
                r.threads
            )));
        }
        if let Some(b) = &self.batching {
            check_batching(b, r.max_batch_size)?;
            self.check_batch_dims()?;
        }
        if self.hardware.preferred.is_empty() {
            return Err(invalid(
                "hardware.preferred is empty: list at least one of \"cpu\", \"gpu\", \"npu\"",
            ));
        }
        for (key, value) in &self.capabilities.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(invalid(format!(
                    "capabilities.env key {key:?} is not a valid variable name: \
                     use a non-empty name without `=`"
                )));
            }
            if value.contains('\0') {
                return Err(invalid(format!(
                    "capabilities.env.{key} contains a NUL byte: remove it"
                )));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Whether every input and output leads with a variable dimension, the batch: a batch joins
    /// its requests' inputs along dim 0 and splits each output along it, so an output that does
    /// not scale with the batch (a pair of statistics, say) would be cut into wrong pieces
    /// whenever its size happened to equal the batch's rows.
    pub fn check_batch_dims(&self) -> Result<()> {
        for (kind, tensors) in [("input", &self.inputs), ("output", &self.outputs)] {
            if let Some(t) = tensors.iter().find(|t| t.shape.first() != Some(&-1)) {
                return Err(invalid(format!(
                    "dynamic batching joins and splits every input and output along dim 0, \
                     the batch: {kind} `{}` has shape {:?}; declare its first dimension -1, or \
                     leave [batching] out",
                    t.name, t.shape
                )));
            }
        }
        Ok(())
    }
}

/// A `[batching]` table against the model's `max_batch_size`.
pub fn check_batching(b: &Batching, model_max: u32) -> Result<()> {
    if model_max == 0 {
        return Err(invalid(
            "[batching] needs a model that batches: set resources.max_batch_size above 0 \
             (dim 0 of every input and output is then the batch)",
        ));
    }
    if b.max_batch_size > model_max {
        return Err(invalid(format!(
            "batching.max_batch_size = {} is over resources.max_batch_size = {model_max}",
            b.max_batch_size
        )));
    }
    if b.max_queue_delay_us > MAX_QUEUE_DELAY_US {
        return Err(invalid(format!(
            "batching.max_queue_delay_us = {} is over one second ({MAX_QUEUE_DELAY_US})",
            b.max_queue_delay_us
        )));
    }
    let limit = b.limit(model_max);
    if let Some(p) = b
        .preferred_batch_sizes
        .iter()
        .find(|p| **p == 0 || **p > limit)
    {
        return Err(invalid(format!(
            "batching.preferred_batch_sizes holds {p}: use sizes from 1 to {limit}"
        )));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> Error {
    Error::Manifest(message.into())
}

/// `[a-zA-Z0-9_.-]{1,64}`.
fn check_id(what: &str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {value:?} is not valid: use 1 to {MAX_NAME_LEN} of a-z, A-Z, 0-9, `_`, `.`, `-`"
        )))
    }
}

/// A relative path of normal `/`-separated components: no `..`, `.`, empty components, absolute
/// paths, backslashes, drive letters or control characters.
pub(crate) fn check_file(what: &str, path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(invalid(format!(
            "{what} {path:?} {why}: name a file inside the manifest's directory, \
             like \"model.onnx\" or \"models/model.onnx\""
        )))
    };
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > MAX_FILE_LEN {
        return bad(&format!("is longer than {MAX_FILE_LEN} bytes"));
    }
    if path
        .chars()
        .any(|c| c.is_control() || c == '\\' || c == ':')
    {
        return bad("contains a control character, `\\` or `:`");
    }
    if path.starts_with('/') {
        return bad("is absolute");
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return bad("has an empty, `.` or `..` component");
    }
    Ok(())
}

fn check_tensors(kind: &str, tensors: &[TensorSpec]) -> Result<()> {
    if tensors.is_empty() {
        return Err(invalid(format!(
            "no {kind}s declared: add at least one [[{kind}s]] entry"
        )));
    }
    if tensors.len() > MAX_TENSORS {
        return Err(invalid(format!(
            "{} {kind}s declared, at most {MAX_TENSORS} are allowed",
            tensors.len()
        )));
    }
    let mut names = BTreeSet::new();
    for tensor in tensors {
        if tensor.name.is_empty() {
            return Err(invalid(format!(
                "an {kind} has an empty name: name every {kind}"
            )));
        }
        if !names.insert(tensor.name.as_str()) {
            return Err(invalid(format!(
                "{kind} `{}` is declared twice: {kind} names must be unique",
                tensor.name
            )));
        }
        if let Some(dim) = tensor.shape.iter().find(|d| **d < -1) {
            return Err(invalid(format!(
                "{kind} `{}` has dimension {dim}: use a size >= 0, or -1 for a variable dimension",
                tensor.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Datatype;

    const EXAMPLE: &str = r#"
[model]
name = "mnist"
version = "1"
description = "handwritten digits"

[component]
file = "component.wasm"

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

[resources]
memory_mb = 512
timeout_ms = 2000

[hardware]
preferred = ["gpu", "cpu"]

[capabilities]
env = { LABELS = "a,b,c" }
"#;

    fn example() -> Manifest {
        Manifest::from_toml(EXAMPLE).expect("example manifest is valid")
    }

    fn err(manifest: &Manifest) -> String {
        match manifest.validate() {
            Ok(()) => panic!("manifest should be invalid: {manifest:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let m = example();
        assert_eq!(m.model.name, "mnist");
        assert_eq!(m.model.description.as_deref(), Some("handwritten digits"));
        assert_eq!(m.inputs[0].datatype, Datatype::Fp32);
        assert_eq!(m.inputs[0].shape, vec![-1, 784]);
        assert_eq!(m.graphs[0].encoding, GraphEncoding::Onnx);
        assert_eq!(m.resources.memory_mb, 512);
        assert_eq!(m.resources.max_concurrency, 0);
        assert_eq!(m.hardware.preferred, vec![Device::Gpu, Device::Cpu]);
        assert_eq!(m.capabilities.env["LABELS"], "a,b,c");
    }

    #[test]
    fn batching_needs_every_tensor_to_lead_with_the_batch() {
        let mut m = example();
        m.resources.max_batch_size = 8;
        m.batching = Some(Batching {
            max_batch_size: 0,
            preferred_batch_sizes: Vec::new(),
            max_queue_delay_us: 100,
        });
        m.validate().expect("both lead with -1");
        // An output that does not scale with the batch.
        m.outputs[0].shape = vec![2];
        let e = err(&m);
        assert!(e.contains("output `output` has shape [2]"), "{e}");
        // Without [batching] it is the model's own business.
        m.batching = None;
        m.validate().expect("no batching");
    }

    #[test]
    fn defaults_apply_to_omitted_sections() {
        let text = r#"
[model]
name = "m"
version = "v1.0"
[component]
file = "c.wasm"
[[inputs]]
name = "x"
datatype = "INT64"
shape = []
[[outputs]]
name = "y"
datatype = "BYTES"
shape = [-1]
"#;
        let m = Manifest::from_toml(text).expect("valid");
        assert_eq!(m.resources, Resources::default());
        assert_eq!(m.resources.memory_mb, 256);
        assert_eq!(m.resources.timeout_ms, 10_000);
        assert_eq!(m.hardware.preferred, vec![Device::Cpu]);
        assert!(m.capabilities.env.is_empty());
        assert!(m.graphs.is_empty());
    }

    #[test]
    fn toml_round_trips() {
        let m = example();
        let text = m.to_toml().expect("serialise");
        assert_eq!(Manifest::from_toml(&text).expect("reparse"), m);
        let mut bare = m.clone();
        bare.graphs.clear();
        bare.capabilities.env.clear();
        bare.model.description = None;
        let text = bare.to_toml().expect("serialise");
        assert_eq!(Manifest::from_toml(&text).expect("reparse"), bare);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = EXAMPLE.replace("timeout_ms = 2000", "timeout_ms = 2000\ngpus = 2");
        let e = Manifest::from_toml(&text).expect_err("unknown field");
        assert!(e.to_string().contains("gpus"), "{e}");
        let e = Manifest::from_toml("not toml [").expect_err("syntax");
        assert!(e.to_string().starts_with("invalid manifest"), "{e}");
        let text = EXAMPLE.replace("\"FP32\"", "\"FLOAT\"");
        assert!(Manifest::from_toml(&text).is_err());
    }

    #[test]
    fn names_must_be_well_formed() {
        for bad in ["", "has space", "a/b", "ü", &"x".repeat(65)] {
            let mut m = example();
            m.model.name = bad.to_string();
            assert!(err(&m).contains("model name"), "{bad:?}");
            let mut m = example();
            m.model.version = bad.to_string();
            assert!(err(&m).contains("model version"), "{bad:?}");
        }
        let mut m = example();
        m.model.name = "A-z_0.9".into();
        m.validate().expect("valid charset");
    }

    #[test]
    fn tensors_must_be_declared_named_unique_and_shaped() {
        let mut m = example();
        m.inputs.clear();
        assert!(err(&m).contains("no inputs declared"));
        let mut m = example();
        m.outputs.clear();
        assert!(err(&m).contains("no outputs declared"));
        let mut m = example();
        m.inputs.push(m.inputs[0].clone());
        assert!(err(&m).contains("input `input` is declared twice"));
        let mut m = example();
        m.outputs[0].name.clear();
        assert!(err(&m).contains("empty name"));
        let mut m = example();
        m.outputs[0].shape = vec![-2, 3];
        assert!(err(&m).contains("dimension -2"));
        // An input and an output may share a name.
        let mut m = example();
        m.outputs[0].name = "input".into();
        m.validate().expect("separate namespaces");
    }

    #[test]
    fn graphs_must_be_unique_and_files_relative() {
        let mut m = example();
        m.graphs.push(m.graphs[0].clone());
        assert!(err(&m).contains("graph `model` is declared twice"));
        let mut m = example();
        m.graphs[0].name.clear();
        assert!(err(&m).contains("empty name"));
        for bad in [
            "",
            "/etc/passwd",
            "../model.onnx",
            "a/../../b",
            "./model.onnx",
            "a//b",
            "dir/",
            "c:\\model.onnx",
            "a\\b",
            "new\nline",
        ] {
            let mut m = example();
            m.graphs[0].file = bad.to_string();
            assert!(err(&m).contains("graph `model` file"), "{bad:?}");
            let mut m = example();
            m.component.file = bad.to_string();
            assert!(err(&m).contains("component file"), "{bad:?}");
        }
        let mut m = example();
        m.graphs[0].file = "weights/v1/model.onnx".into();
        m.validate().expect("nested relative path");
    }

    #[test]
    fn resources_hardware_and_env_are_checked() {
        for (memory, ok) in [(0, false), (1, true), (65_536, true), (65_537, false)] {
            let mut m = example();
            m.resources.memory_mb = memory;
            assert_eq!(m.validate().is_ok(), ok, "memory_mb = {memory}");
        }
        let mut m = example();
        m.resources.timeout_ms = 0;
        assert!(err(&m).contains("timeout_ms"));
        let mut m = example();
        m.hardware.preferred.clear();
        assert!(err(&m).contains("hardware.preferred"));
        let mut m = example();
        m.capabilities.env.insert("A=B".into(), "x".into());
        assert!(err(&m).contains("capabilities.env"));
        let mut m = example();
        m.capabilities.env.insert("A".into(), "x\0y".into());
        assert!(err(&m).contains("NUL"));
    }

    #[test]
    fn toml_rejects_bad_enums() {
        let text = EXAMPLE.replace("encoding = \"onnx\"", "encoding = \"tflite\"");
        assert!(Manifest::from_toml(&text).is_err());
        let text = EXAMPLE.replace("[\"gpu\", \"cpu\"]", "[\"tpu\"]");
        assert!(Manifest::from_toml(&text).is_err());
    }
}
