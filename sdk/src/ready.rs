//! Ready-made example bundles: what `sophon dev` serves out of the box, and what tests and
//! benchmarks use. Each is built from an [`crate::examples::Mlp`] generated in Rust and one of the
//! ready-made components, then signed with the key given.

use crate::bundle::pack_parts;
use crate::components;
use crate::error::Result;
use crate::examples::Mlp;
use crate::manifest::{GraphEncoding, GraphSpec, Manifest, ModelInfo};
use crate::onnx::onnx_manifest;
use crate::types::{Datatype, TensorSpec};
use ed25519_dalek::SigningKey;

/// The MLP of the benchmarks: 784 → 128 → 10, FP32, any batch size.
pub fn mlp() -> Mlp {
    Mlp::new(784, 128, 10, 7)
}

/// The classifier's network: 8x8 pixels → 32 → 10 digit classes.
pub fn classifier_mlp() -> Mlp {
    Mlp::new(64, 32, 10, 11)
}

/// The digit labels the classifier example reports.
pub const DIGIT_LABELS: &str = "zero,one,two,three,four,five,six,seven,eight,nine";

/// `name` serving [`mlp`] through the generic ONNX passthrough.
pub fn mlp_bundle(name: &str, key: &SigningKey) -> Result<Vec<u8>> {
    let onnx = mlp().to_onnx();
    let manifest = onnx_manifest(&onnx, name, "1")?;
    pack_parts(
        &manifest,
        components::PASSTHROUGH,
        &[("model.onnx".to_string(), onnx)],
        key,
    )
}

/// `classifier`: UINT8 8x8 images in; softmax probabilities and the top-3 labels out, with the
/// pre- and post-processing in the guest and the labels granted as an environment variable.
pub fn classifier_bundle(key: &SigningKey) -> Result<Vec<u8>> {
    let onnx = classifier_mlp().to_onnx();
    let mut manifest = Manifest {
        model: ModelInfo {
            name: "classifier".to_string(),
            version: "1".to_string(),
            description: Some(
                "8x8 digit classifier: scaling, softmax and top-k run in the Wasm guest".into(),
            ),
        },
        inputs: vec![TensorSpec {
            name: "image".into(),
            datatype: Datatype::Uint8,
            shape: vec![-1, 64],
        }],
        outputs: vec![
            TensorSpec {
                name: "probabilities".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 10],
            },
            TensorSpec {
                name: "labels".into(),
                datatype: Datatype::Bytes,
                shape: vec![-1, 3],
            },
        ],
        graphs: vec![GraphSpec {
            name: "model".into(),
            file: "model.onnx".into(),
            encoding: GraphEncoding::Onnx,
            shapes: Default::default(),
            weights: None,
        }],
        ..Manifest::default()
    };
    manifest
        .capabilities
        .env
        .insert("LABELS".into(), DIGIT_LABELS.into());
    manifest.capabilities.env.insert("TOP_K".into(), "3".into());
    pack_parts(
        &manifest,
        components::CLASSIFIER,
        &[("model.onnx".to_string(), onnx)],
        key,
    )
}

/// A bundle of one of the hostile test guests (see [`components::hostile`]): it declares one
/// FP32 input `x` of any length and one output `y`, and has no graph.
pub fn hostile_bundle(
    name: &str,
    component: &[u8],
    memory_mb: u32,
    timeout_ms: u64,
    key: &SigningKey,
) -> Result<Vec<u8>> {
    let mut manifest = Manifest {
        model: ModelInfo {
            name: name.to_string(),
            version: "1".to_string(),
            description: None,
        },
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1],
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1],
        }],
        ..Manifest::default()
    };
    manifest.resources.memory_mb = memory_mb;
    manifest.resources.timeout_ms = timeout_ms;
    pack_parts(&manifest, component, &[], key)
}
