//! Generates the gRPC service (and the client that the mesh tests call it with) from
//! `proto/inference.proto`, with the protoc that the `protoc-bin-vendored` crate ships, so that
//! nobody installs one.

#[allow(unsafe_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script runs on one thread; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_client(true)
        .compile_protos(&["proto/inference.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/inference.proto");
    Ok(())
}
