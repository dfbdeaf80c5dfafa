//! Builds the guest workspace (`sdk/guest`) for `wasm32-wasip2` and places the components in
//! `OUT_DIR`, so the ready-made components are compiled from source and never checked in.

use std::path::{Path, PathBuf};
use std::process::Command;

const COMPONENTS: [&str; 7] = [
    "passthrough",
    "classifier",
    "spin",
    "membomb",
    "trap",
    "hugeout",
    "probe",
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    println!("cargo:rerun-if-changed={}", guest_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../wit/wit").display()
    );

    // <target>/<profile>/build/<pkg>/out: share one guest target dir across profiles.
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|t| t.join("sophon-guests"))
        .unwrap_or_else(|| out_dir.join("sophon-guests"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Components start with 4 MiB of linear memory. With copy-on-write images the untouched pages
    // cost nothing, and a typical request then never calls `memory.grow` (a host call plus an
    // `mprotect`, which on a multi-threaded host means a TLB shootdown on every core).
    cmd.env(
        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
        "-C link-arg=--initial-memory=4194304",
    );
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("could not run cargo to build the guest components");
    if !status.success() {
        panic!(
            "building the guest components in {} failed; is the wasm32-wasip2 target installed? \
             (`rustup target add wasm32-wasip2`)",
            guest_dir.display()
        );
    }
    let built = target_dir.join("wasm32-wasip2").join("release");
    for name in COMPONENTS {
        copy(
            &built.join(format!("sophon_{name}.wasm")),
            &out_dir.join(format!("{name}.wasm")),
        );
    }
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!("copying {} to {}: {e}", from.display(), to.display());
    }
}
