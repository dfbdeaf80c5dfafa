//! The `sophon:model` WIT package, the contract between a Sophon node and a model component.
//!
//! The WIT files live in `wit/wit/` (with `wasi:nn` vendored under `wit/wit/deps/`). The host runs
//! `wasmtime::component::bindgen!` over this folder once (in `sophon-node`), the guest SDK runs
//! `wit_bindgen::generate!` over it once (in `sdk/guest`). This crate only exposes where it lies.

/// Absolute path of the WIT folder (the `sophon:model` package and its deps).
pub const WIT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/wit");

/// The version of the `sophon:model` package the node speaks.
pub const PACKAGE_VERSION: &str = "0.1.0";
