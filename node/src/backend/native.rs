//! Finding a native inference library at run time: an environment variable naming the file,
//! else the Python wheel that ships it, in a virtual environment (`$VIRTUAL_ENV`, or a `.venv`
//! in the working directory or one above it) or in a user or system site-packages.

use std::path::{Path, PathBuf};

use wasmtime_wasi_nn::Tensor;
use wasmtime_wasi_nn::backend::{BackendError, BackendExecutionContext, Id, NamedTensor};
use wasmtime_wasi_nn::wit::TensorType;

use super::memory::{self, Held};

/// Where a backend's library lives in its wheel: `site-packages/<dir...>/<prefix>*`.
pub struct Wheel {
    /// The environment variable that names the library file outright.
    pub env: &'static str,
    /// The directories under site-packages, e.g. `["onnxruntime", "capi"]`.
    pub dir: &'static [&'static str],
    /// The start of the library's file name, e.g. `libonnxruntime.so`.
    pub prefix: &'static str,
    /// What to tell a user who has neither (`pip install ...`).
    pub install: &'static str,
}

impl Wheel {
    /// The library's path, or why none was found.
    pub fn find(&self) -> Result<PathBuf, String> {
        if let Some(path) = std::env::var_os(self.env) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{}={} is not a file: point it at {}",
                    self.env,
                    path.display(),
                    self.prefix
                ))
            };
        }
        let mut roots: Vec<PathBuf> = Vec::new();
        if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
            roots.push(PathBuf::from(venv).join("lib"));
        }
        if let Ok(cwd) = std::env::current_dir() {
            roots.extend(cwd.ancestors().map(|d| d.join(".venv").join("lib")));
        }
        if let Some(home) = std::env::var_os("HOME") {
            roots.push(PathBuf::from(home).join(".local").join("lib"));
        }
        roots.push(PathBuf::from("/usr/local/lib"));
        roots.push(PathBuf::from("/usr/lib"));
        for root in &roots {
            if let Some(found) = self.in_site_packages(root) {
                return Ok(found);
            }
        }
        Err(format!(
            "no {} found: set {}, or {} (in a virtual environment: activate it, or run from the \
             directory that holds its .venv)",
            self.prefix, self.env, self.install
        ))
    }

    /// `<root>/python3*/{site,dist}-packages/<dir>/<prefix>*`, the last by name.
    fn in_site_packages(&self, root: &Path) -> Option<PathBuf> {
        let pythons = std::fs::read_dir(root).ok()?;
        for python in pythons.flatten() {
            if !python.file_name().to_string_lossy().starts_with("python3") {
                continue;
            }
            for packages in ["site-packages", "dist-packages"] {
                let mut dir = python.path().join(packages);
                for part in self.dir {
                    dir.push(part);
                }
                let Ok(files) = std::fs::read_dir(&dir) else {
                    continue;
                };
                let mut libs: Vec<PathBuf> = files
                    .flatten()
                    .map(|f| f.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(self.prefix))
                    })
                    .collect();
                libs.sort();
                if let Some(lib) = libs.pop() {
                    return Some(lib);
                }
            }
        }
        None
    }
}

/// Idle library objects of one graph (sessions, infer requests), made on demand: a request
/// takes one to run on alone, and gives it back unless the pool already keeps `capacity`. The
/// lock is held only to take or give back.
pub struct Pool<T> {
    idle: parking_lot::Mutex<Vec<T>>,
    capacity: usize,
}

impl<T> Pool<T> {
    /// A pool holding `first` (made at load, so a graph the library refuses fails there).
    pub fn new(first: T, capacity: usize) -> Pool<T> {
        Pool {
            idle: parking_lot::Mutex::new(vec![first]),
            capacity,
        }
    }

    /// An idle one, or a new one from `make`.
    pub fn take<E>(&self, make: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let idle = self.idle.lock().pop();
        match idle {
            Some(t) => Ok(t),
            None => make(),
        }
    }

    pub fn give_back(&self, t: T) {
        let mut idle = self.idle.lock();
        if idle.len() < self.capacity {
            idle.push(t);
        }
    }
}

/// A graph input as a native library declares it, in wasi-nn's terms.
#[derive(Clone, Debug)]
pub struct NativeInput {
    pub name: String,
    /// The wasi-nn type that carries it (the same element width).
    pub carrier: TensorType,
    /// Bytes per element.
    pub width: usize,
    /// Booleans: every byte must be 0 or 1.
    pub boolean: bool,
    /// The library's name for its type, for errors.
    pub ty: String,
}

/// What a native library does for one graph; [`NativeContext`] does the rest (checking inputs,
/// staging them, charging memory, handing outputs back).
pub trait NativeGraph: Clone + Send + Sync + 'static {
    /// An input in the library's own form, ready to run.
    type Staged: Send;
    /// The library's name, for errors (`onnxruntime`, `openvino`).
    const LIBRARY: &'static str;
    fn inputs(&self) -> &[NativeInput];
    /// Make input `ix` (already checked against its declaration) in the library's form.
    fn stage(&self, ix: usize, shape: &[u32], data: &[u8]) -> Result<Self::Staged, String>;
    /// Run with every input staged, in declaration order; the outputs, copied out.
    fn run(&self, inputs: Vec<Self::Staged>) -> Result<Vec<(String, Tensor)>, BackendError>;
}

/// An execution context on a native library: staged inputs and the outputs it keeps.
pub struct NativeContext<G: NativeGraph> {
    graph: G,
    staged: Vec<Option<Staged<G::Staged>>>,
    outputs: Vec<(String, Tensor)>,
    held: Held,
}

/// A staged input and the bytes charged for it. Only the context that owns it touches it, and
/// only through `&mut self`, so it needs no `Sync` of its own.
struct Staged<T>(T, usize);

// SAFETY: a `Staged` is reached only through `&mut NativeContext` (to replace or take it); no
// `&self` method of the context reads it, so sharing `&NativeContext` shares no access to it.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for Staged<T> {}

/// What a context is charged for its library state, besides its tensors.
const STATE_BYTES: usize = 256 << 10;

impl<G: NativeGraph> NativeContext<G> {
    /// A new context on `graph`.
    pub fn new(graph: G) -> Result<NativeContext<G>, memory::Exceeded> {
        let mut held = Held::new();
        held.charge(STATE_BYTES, "a wasi-nn execution context")?;
        let staged = (0..graph.inputs().len()).map(|_| None).collect();
        Ok(NativeContext {
            graph,
            staged,
            outputs: Vec::new(),
            held,
        })
    }

    /// Boxed, as wasmtime-wasi-nn takes it.
    pub fn boxed(graph: G) -> Result<wasmtime_wasi_nn::ExecutionContext, BackendError> {
        let ctx = NativeContext::new(graph).map_err(|e| invalid(e.to_string()))?;
        Ok(wasmtime_wasi_nn::ExecutionContext::from(
            Box::new(ctx) as Box<dyn BackendExecutionContext>
        ))
    }

    fn input_index(&self, id: &Id) -> Result<usize, BackendError> {
        let inputs = self.graph.inputs();
        match id {
            Id::Index(i) if (*i as usize) < inputs.len() => Ok(*i as usize),
            Id::Name(n) => inputs.iter().position(|x| &x.name == n).ok_or_else(|| {
                let names: Vec<&str> = inputs.iter().map(|x| x.name.as_str()).collect();
                invalid(format!(
                    "the graph has no input `{n}`; its inputs are {names:?}"
                ))
            }),
            Id::Index(i) => Err(invalid(format!("the graph has no input #{i}"))),
        }
    }

    fn run(&mut self) -> Result<(), BackendError> {
        let mut values = Vec::with_capacity(self.staged.len());
        let mut staged_bytes = 0;
        for (ix, slot) in self.staged.iter_mut().enumerate() {
            let Staged(value, bytes) = slot.take().ok_or_else(|| {
                invalid(format!(
                    "input `{}` was not given",
                    self.graph.inputs()[ix].name
                ))
            })?;
            staged_bytes += bytes;
            values.push(value);
        }
        self.held.release(staged_bytes);
        let graph = &self.graph;
        let outputs = super::catch_panic(G::LIBRARY, || graph.run(values)).map_err(invalid)??;
        let kept: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        self.held
            .charge(kept, "wasi-nn outputs")
            .map_err(over_limit)?;
        self.outputs = outputs;
        Ok(())
    }
}

impl<G: NativeGraph> BackendExecutionContext for NativeContext<G> {
    fn set_input(&mut self, id: Id, tensor: &Tensor) -> Result<(), BackendError> {
        let ix = self.input_index(&id)?;
        let input = &self.graph.inputs()[ix];
        let name = &input.name;
        if tensor.ty != input.carrier {
            return Err(invalid(format!(
                "input `{name}` is {:?} but the graph expects {}",
                tensor.ty, input.ty
            )));
        }
        let count = tensor
            .dimensions
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize))
            .ok_or_else(|| invalid(format!("input `{name}` has too many elements")))?;
        if count.checked_mul(input.width) != Some(tensor.data.len()) {
            return Err(invalid(format!(
                "input `{name}` has {} bytes; shape {:?} of {} needs {}",
                tensor.data.len(),
                tensor.dimensions,
                input.ty,
                count.saturating_mul(input.width)
            )));
        }
        if input.boolean && tensor.data.iter().any(|b| *b > 1) {
            return Err(invalid(format!(
                "input `{name}` is BOOL but holds a byte other than 0 or 1"
            )));
        }
        self.held
            .charge(tensor.data.len(), "wasi-nn inputs")
            .map_err(over_limit)?;
        let made = self
            .graph
            .stage(ix, &tensor.dimensions, &tensor.data)
            .map_err(|e| invalid(format!("input `{name}`: {}: {e}", G::LIBRARY)));
        let value = match made {
            Ok(value) => value,
            Err(e) => {
                self.held.release(tensor.data.len());
                return Err(e);
            }
        };
        if let Some(Staged(_, old)) = self.staged[ix].replace(Staged(value, tensor.data.len())) {
            self.held.release(old);
        }
        Ok(())
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let named = inputs.is_some();
        for input in inputs.into_iter().flatten() {
            self.set_input(Id::Name(input.name), &input.tensor)?;
        }
        self.run()?;
        if !named {
            return Ok(None);
        }
        let outputs = std::mem::take(&mut self.outputs);
        let moved: usize = outputs.iter().map(|(_, t)| t.data.len()).sum();
        self.held.release(moved);
        memory::charge_call(moved, "wasi-nn outputs").map_err(over_limit)?;
        Ok(Some(
            outputs
                .into_iter()
                .map(|(name, tensor)| NamedTensor { name, tensor })
                .collect(),
        ))
    }

    fn get_output(&mut self, id: Id) -> Result<Tensor, BackendError> {
        let found = match &id {
            Id::Index(i) => self.outputs.get(*i as usize),
            Id::Name(n) => self.outputs.iter().find(|(name, _)| name == n),
        };
        let (_, tensor) = found.ok_or_else(|| invalid(format!("no output {id:?}")))?;
        memory::charge_call(tensor.data.len(), "wasi-nn outputs").map_err(over_limit)?;
        Ok(tensor.clone())
    }
}

fn over_limit(e: memory::Exceeded) -> BackendError {
    invalid(e.to_string())
}

/// A backend error that is the model's or the node's (a 500).
pub fn invalid(message: String) -> BackendError {
    super::remember_error(&message, false);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}

/// A backend error that is the request's (a 400).
pub fn invalid_input(message: String) -> BackendError {
    super::remember_error(&message, true);
    BackendError::BackendAccess(wasmtime::format_err!("{message}"))
}

/// The wasi-nn tensor of an output: `count` elements of `width` bytes at `data`, copied.
pub fn output_tensor(
    name: &str,
    shape: &[i64],
    carrier: TensorType,
    data: &[u8],
) -> Result<Tensor, BackendError> {
    let shape: Vec<u32> = shape
        .iter()
        .map(|d| u32::try_from(*d))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid(format!("output `{name}` has a dimension over u32")))?;
    Ok(Tensor::new(shape, carrier, data.to_vec()))
}
