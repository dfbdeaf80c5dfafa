//! Builds the guest workspace (`sdk/guest`) for `wasm32-wasip2` and places the components in
//! `OUT_DIR`, so the ready-made components are compiled from source and never checked in.

use std::path::{Path, PathBuf};
use std::process::Command;

const COMPONENTS: [&str; 10] = [
    "passthrough",
    "classifier",
    "spin",
    "membomb",
    "trap",
    "hugeout",
    "probe",
    "sleeper",
    "tensorbomb",
    "flaky",
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

    ensure_wasm_target();
    // The guest workspace, then the passthrough, a workspace of its own (built without std).
    for dir in [guest_dir.clone(), guest_dir.join("components/passthrough")] {
        build_guests(&dir, &target_dir);
    }
    let built = target_dir.join("wasm32-wasip2").join("release");
    for name in COMPONENTS {
        copy(
            &built.join(format!("sophon_{name}.wasm")),
            &out_dir.join(format!("{name}.wasm")),
        );
    }
}

/// Build the guest workspace in `dir` for `wasm32-wasip2` into `target_dir`.
fn build_guests(dir: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target_dir);
    // Components start with 2 MiB of linear memory and a 256 KiB stack. With copy-on-write
    // images the untouched pages cost nothing, and a typical request (the MLP at batch 32
    // included) never calls `memory.grow` (a host call plus an `mprotect`, which on a
    // multi-threaded host means a TLB shootdown on every core). No larger: each request's
    // teardown walks the page tables of the whole initial memory (PAGEMAP_SCAN) to find the
    // pages it dirtied, and 4 MiB cost 0.3–0.9 µs more per request than 2 MiB.
    cmd.env(
        "CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS",
        "-C link-arg=--initial-memory=2097152 -C link-arg=-zstack-size=262144",
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
            dir.display()
        );
    }
}

const WASM_TARGET: &str = "wasm32-wasip2";

/// Adds the `wasm32-wasip2` target when the toolchain in use lacks it and rustup is there.
///
/// rustup installs the targets of `rust-toolchain.toml` only when it installs the toolchain
/// itself; a machine that already had Rust 1.95 has no `wasm32-wasip2` until someone adds it.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = || {
        Command::new(&rustc)
            .args(["--print", "sysroot"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    let Some(root) = sysroot() else { return };
    let has_target = |root: &Path| root.join("lib/rustlib").join(WASM_TARGET).is_dir();
    if has_target(&root) {
        return;
    }
    println!(
        "cargo:warning=the {WASM_TARGET} target is missing from {}: running `rustup target add {WASM_TARGET}`",
        root.display()
    );
    // The toolchain in use, as rustup names it; and the one the sysroot belongs to, should
    // they differ (a toolchain that is another's alias reports the other's sysroot).
    let mut toolchains: Vec<Option<String>> = vec![std::env::var("RUSTUP_TOOLCHAIN").ok()];
    if let Some(name) = root.file_name().and_then(|n| n.to_str()) {
        toolchains.push(Some(name.to_string()));
    }
    for toolchain in toolchains {
        let mut rustup = Command::new("rustup");
        rustup.args(["target", "add", WASM_TARGET]);
        if let Some(toolchain) = &toolchain {
            rustup.args(["--toolchain", toolchain]);
        }
        match rustup.status() {
            Ok(status) if status.success() => {}
            Ok(status) => println!(
                "cargo:warning=`rustup target add {WASM_TARGET}` failed ({status}); add the target by hand"
            ),
            Err(e) => {
                println!(
                    "cargo:warning=rustup is not available ({e}); install the {WASM_TARGET} target for this toolchain"
                );
                return;
            }
        }
        if has_target(&root) {
            return;
        }
    }
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        panic!("copying {} to {}: {e}", from.display(), to.display());
    }
}
