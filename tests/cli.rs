//! The `sophon` binary's bundle commands, run as a user would: keygen, pack (a manifest directory
//! and a plain ONNX file), inspect, and refusal of a tampered bundle.

use std::path::Path;
use std::process::{Command, Output};

fn sophon(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(args)
        .env("SOPHON_HOME", home)
        .env("SOPHON_LOG", "warn")
        .output()
        .expect("run sophon")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn keygen_pack_inspect_and_refuse_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let out = ok(&sophon(&home, &["keygen"]));
    assert!(out.contains("publisher.key"));
    assert!(home.join("publisher.pub").exists());
    let again = sophon(&home, &["keygen"]);
    assert!(
        !again.status.success(),
        "keygen must not overwrite a key silently"
    );
    ok(&sophon(&home, &["keygen", "--force"]));

    // A plain ONNX file, packed with the passthrough component.
    let onnx = dir.path().join("mlp.onnx");
    std::fs::write(&onnx, sophon_sdk::examples::mlp_onnx(4, 8, 3, 1)).expect("write onnx");
    let bundle = dir.path().join("mlp.sbundle");
    let args = [
        "pack",
        "--onnx",
        onnx.to_str().expect("utf-8"),
        "--name",
        "tiny",
        "-o",
    ];
    let out = ok(&sophon(
        &home,
        &[&args[..], &[bundle.to_str().expect("utf-8")]].concat(),
    ));
    assert!(out.contains("digest"));
    let shown = ok(&sophon(
        &home,
        &["inspect", bundle.to_str().expect("utf-8")],
    ));
    assert!(shown.contains("model      tiny version 1"), "{shown}");
    assert!(shown.contains("input      input FP32 [-1, 4]"), "{shown}");
    assert!(shown.contains("signature  valid"));
    // `sophon inspect b | head -1`: the reader goes away; the command stops quietly.
    let mut early = Command::new(env!("CARGO_BIN_EXE_sophon"))
        .args(["inspect", bundle.to_str().expect("utf-8")])
        .env("SOPHON_HOME", &home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sophon");
    drop(early.stdout.take());
    let out = early.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        matches!(out.status.code(), Some(0 | 141)),
        "{:?}",
        out.status
    );
    let json = ok(&sophon(
        &home,
        &["inspect", "--json", bundle.to_str().expect("utf-8")],
    ));
    let json: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        json["manifest"]["outputs"][0]["shape"],
        serde_json::json!([-1, 3])
    );

    // A manifest directory.
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).expect("mkdir");
    std::fs::copy(&onnx, model_dir.join("model.onnx")).expect("copy");
    std::fs::write(
        model_dir.join("component.wasm"),
        sophon_sdk::components::PASSTHROUGH,
    )
    .expect("write");
    std::fs::write(
        model_dir.join("sophon.toml"),
        r#"
[model]
name = "fromdir"
version = "3"
[component]
file = "component.wasm"
[[inputs]]
name = "input"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "output"
datatype = "FP32"
shape = [-1, 3]
[[graphs]]
name = "model"
file = "model.onnx"
encoding = "onnx"
"#,
    )
    .expect("write manifest");
    let out = ok(&sophon(
        &home,
        &[
            "pack",
            model_dir.to_str().expect("utf-8"),
            "-o",
            dir.path().join("d.sbundle").to_str().expect("utf-8"),
        ],
    ));
    assert!(out.contains("d.sbundle"));

    // One flipped byte: inspect refuses it and says why.
    let mut bytes = std::fs::read(&bundle).expect("read");
    let at = bytes.len() / 3;
    bytes[at] ^= 1;
    std::fs::write(&bundle, bytes).expect("write");
    let out = sophon(&home, &["inspect", bundle.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a valid bundle"), "{err}");
}

#[test]
fn serving_limits_of_zero_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    for (flag, value, says) in [
        ("--max-connections", "0", "must be above zero"),
        ("--max-connections-per-client", "0", "must be above zero"),
        ("--concurrency", "0", "must be above zero"),
        ("--workers", "0", "must be above zero"),
        ("--max-body-bytes", "0", "must be above zero"),
        ("--max-inflight-bytes", "0", "must be above zero"),
        ("--model-memory", "0", "must be above zero"),
        ("--workers", "two", "is not a whole number"),
        ("--header-timeout", "0s", "above zero"),
        ("--body-timeout", "0", "above zero"),
    ] {
        // Refused while parsing the arguments: nothing is bound, so the ports do not matter.
        let out = sophon(
            &home,
            &["dev", "--no-coordinator", "--grpc", "off", flag, value],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{flag} {value}: {stderr}"
        );
    }
}

#[test]
fn pack_labels_an_output_for_classification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    ok(&sophon(&home, &["keygen"]));
    let onnx = dir.path().join("mlp.onnx");
    std::fs::write(&onnx, sophon_sdk::examples::mlp_onnx(4, 8, 3, 1)).expect("write onnx");
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "cat\ndog\nmug\n").expect("write labels");
    let bundle = dir.path().join("mlp.sbundle");
    let pack = |label: &str| {
        sophon(
            &home,
            &[
                "pack",
                "--onnx",
                onnx.to_str().expect("utf-8"),
                "--name",
                "tiny",
                "--labels",
                label,
                "-o",
                bundle.to_str().expect("utf-8"),
            ],
        )
    };
    ok(&pack(&format!("output={}", labels.display())));
    let shown = ok(&sophon(
        &home,
        &["inspect", bundle.to_str().expect("utf-8")],
    ));
    assert!(
        shown.contains("labels     output: 3 classes (labels/output0.txt)"),
        "{shown}"
    );

    // A flag that is no OUTPUT=FILE, an output the model lacks, a file that is not there.
    let refused = |out: Output, code: i32, says: &str| {
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err:?} lacks {says:?}");
    };
    refused(pack("labels.txt"), 2, "write OUTPUT=FILE");
    refused(
        pack(&format!("ghost={}", labels.display())),
        1,
        "names output `ghost`, which the manifest does not declare",
    );
    refused(
        pack("output=/no/such/labels.txt"),
        1,
        "reading the labels of `output`",
    );
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9\n").expect("write");
    refused(
        pack(&format!("output={}", latin1.display())),
        1,
        "a labels file is not UTF-8 text",
    );
}
