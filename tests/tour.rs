//! The README's quick tour, run literally as a new user would, in a fresh `HOME` and a fresh
//! working directory: keygen, pack, dev, curl, push, approve, deploy, audit.
//!
//! `sophon dev` is started right after `keygen`, which is the order that once made it die at
//! start (it trusted the user's key through a read issued before its coordinator was elected).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sophon");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Tour {
    home: std::path::PathBuf,
    cwd: std::path::PathBuf,
    server: String,
    token: String,
}

impl Tour {
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.cwd)
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SOPHON_LOG", "warn");
        if !self.server.is_empty() {
            cmd.env("SOPHON_SERVER", &self.server)
                .env("SOPHON_TOKEN", &self.token);
        }
        cmd
    }

    fn sophon(&self, args: &[&str]) -> Output {
        self.command(BIN).args(args).output().expect("run sophon")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.sophon(args);
        assert!(
            out.status.success(),
            "sophon {args:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(&[args, &["--json"]].concat());
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_readme_tour_works_in_a_fresh_home() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let cwd = dir.path().join("work");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&cwd).expect("cwd");
    let mut tour = Tour {
        home,
        cwd,
        server: String::new(),
        token: String::new(),
    };
    std::fs::write(
        tour.cwd.join("model.onnx"),
        sophon_sdk::examples::mlp_onnx(4, 8, 3, 1),
    )
    .expect("model");

    // Package your own model.
    tour.ok(&["keygen"]);
    assert!(tour.home.join(".sophon/publisher.pub").exists());
    tour.ok(&[
        "pack",
        "--onnx",
        "model.onnx",
        "--name",
        "mymodel",
        "-o",
        "mymodel.sbundle",
    ]);
    let shown = tour.ok(&["inspect", "mymodel.sbundle"]);
    assert!(shown.contains("signature  valid"), "{shown}");

    // `sophon dev --bundle mymodel.sbundle`, right after keygen.
    let (http, admin, mesh) = (free_port(), free_port(), free_port());
    let mut child = tour
        .command(BIN)
        .args([
            "dev",
            "--bundle",
            "mymodel.sbundle",
            "--http",
            &format!("127.0.0.1:{http}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
            "--mesh",
            &format!("127.0.0.1:{mesh}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sophon dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut dev = Dev(child);
    let mut lines = BufReader::new(stdout).lines();
    let (mut curl, mut export) = (None, None);
    let started = Instant::now();
    while curl.is_none() || export.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "sophon dev did not print its banner"
        );
        let line = match lines.next() {
            Some(Ok(line)) => line,
            _ => panic!(
                "sophon dev exited at start: {:?}",
                dev.0.try_wait().ok().flatten()
            ),
        };
        let line = line.trim().to_string();
        if line.starts_with("curl ") {
            curl = Some(line);
        } else if let Some(vars) = line.strip_prefix("export ") {
            export = Some(vars.to_string());
        }
    }
    // Keep reading what dev prints, so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    // The curl line it printed, pasted into a shell.
    let out = tour
        .command("sh")
        .args(["-c", &curl.expect("curl line")])
        .output()
        .expect("curl");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a V2 answer");
    assert_eq!(answer["model_name"], "classifier", "{answer}");
    assert_eq!(answer["outputs"][1]["name"], "labels", "{answer}");

    // Your own model is served too.
    let out = tour
        .command("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{http}/v2/models/mymodel/infer"),
            "-d",
            r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}"#,
        ])
        .output()
        .expect("curl");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a V2 answer");
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, 3]));

    // The export line it printed.
    for pair in export.expect("export line").split_whitespace() {
        match pair.split_once('=') {
            Some(("SOPHON_SERVER", v)) => tour.server = v.to_string(),
            Some(("SOPHON_TOKEN", v)) => tour.token = v.to_string(),
            _ => {}
        }
    }
    assert!(!tour.server.is_empty() && !tour.token.is_empty());

    // The control plane part of the README.
    tour.ok(&[
        "key",
        "trust",
        "../home/.sophon/publisher.pub",
        "--name",
        "me",
    ]);
    tour.ok(&["model", "push", "mymodel.sbundle"]);
    let models = tour.ok(&["model", "list"]);
    assert!(models.contains("mymodel"), "{models}");
    // `model pull <digest> -o copy.sbundle`, the digest as `model list --json` gives it: the
    // same bytes come back, verified.
    let listed = tour.json(&["model", "list"]);
    let digest = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == "mymodel")
        .flat_map(|m| m["versions"].as_object().into_iter().flatten())
        .find_map(|(_, v)| v["digest"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("mymodel's digest in {listed}"));
    tour.ok(&["model", "pull", &digest, "-o", "copy.sbundle"]);
    assert_eq!(
        std::fs::read(tour.cwd.join("copy.sbundle")).expect("pulled"),
        std::fs::read(tour.cwd.join("mymodel.sbundle")).expect("packed"),
        "the pulled bundle is the pushed one"
    );
    let ann = tour.json(&["token", "create", "--name", "ann", "--role", "approver"]);
    let bob = tour.json(&["token", "create", "--name", "bob", "--role", "approver"]);
    let request = tour.json(&["approval", "request", "mymodel", "1", "production"]);
    let id = request["created"]["approval_request"].to_string();
    let refused = tour.sophon(&["deploy", "create", "mymodel", "1", "production"]);
    assert!(!refused.status.success(), "unapproved: refused");
    for (who, comment) in [(&ann, "eval ok"), (&bob, "load test ok")] {
        let secret = who["secret"].as_str().expect("secret");
        tour.ok(&["approval", "approve", &id, "-c", comment, "--token", secret]);
    }
    tour.ok(&[
        "deploy",
        "create",
        "mymodel",
        "1",
        "production",
        "--replicas",
        "2",
    ]);
    let deployments = tour.ok(&["deploy", "list"]);
    assert!(deployments.contains("mymodel"), "{deployments}");
    tour.ok(&["cluster", "status"]);
    let members = tour.ok(&["cluster", "members"]);
    assert!(
        !members.trim().is_empty(),
        "cluster members lists the dev coordinator"
    );
    let audit = tour.ok(&["audit"]);
    for needle in ["eval ok", "load test ok", "mymodel"] {
        assert!(audit.contains(needle), "audit lacks {needle}: {audit}");
    }

    // The mesh part: two nodes join with one node join token, mymodel's staging deployment
    // (made by `dev --bundle`: deployment 3) scales onto them (`--wait`), and both nodes answer
    // (one without a replica forwards).
    let details = tour.ok(&["node", "join-token", "--uses", "2", "--expires", "1h"]);
    assert!(details.contains("sophon-join:"), "{details}");
    let join = tour.ok(&["node", "join-token", "--uses", "2", "--raw"]);
    let join = join.trim();
    let mut nodes = Vec::new();
    let mut node_http = Vec::new();
    for n in 1..=2 {
        let (http, grpc, mesh) = (free_port(), free_port(), free_port());
        node_http.push(http);
        let child = tour
            .command(BIN)
            .args([
                "node",
                "join",
                "--join-token",
                join,
                "--data",
                &format!("n{n}"),
                "--id",
                &format!("n{n}"),
                "--http",
                &format!("127.0.0.1:{http}"),
                "--grpc",
                &format!("127.0.0.1:{grpc}"),
                "--mesh",
                &format!("127.0.0.1:{mesh}"),
                "--run",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sophon node join --run");
        nodes.push(Dev(child));
    }
    let started = Instant::now();
    loop {
        let listed = tour.ok(&["node", "list"]);
        if listed.matches(" up ").count() >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "dev, n1 and n2 up: {listed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    tour.ok(&["deploy", "scale", "3", "2", "--wait"]);
    let shown = tour.ok(&["deploy", "show", "3"]);
    assert!(shown.contains("mymodel@1"), "{shown}");
    assert_eq!(shown.matches("ready").count(), 2, "{shown}");
    for port in &node_http {
        let started = Instant::now();
        loop {
            let out = tour
                .command("curl")
                .args([
                    "-s",
                    &format!("http://127.0.0.1:{port}/v2/models/mymodel/infer"),
                    "-d",
                    r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}"#,
                ])
                .output()
                .expect("curl");
            let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if answer["outputs"][0]["shape"] == serde_json::json!([1, 3]) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "node on {port} answers: {answer}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Put a new version online and take it back, under load (a client sends requests to n1
    // without pause all along): no request fails.
    tour.ok(&[
        "pack",
        "--onnx",
        "model.onnx",
        "--name",
        "mymodel",
        "--version",
        "2",
        "-o",
        "mymodel-2.sbundle",
    ]);
    tour.ok(&["model", "push", "mymodel-2.sbundle"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{}/v2/models/mymodel/infer", node_http[0]);
    let infer = move || -> Result<String, String> {
        let out = Command::new("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                &url,
                "-d",
                r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}"#,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        let answer: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        match answer["model_version"].as_str() {
            Some(v)
                if code == "200" && answer["outputs"][0]["shape"] == serde_json::json!([1, 3]) =>
            {
                Ok(v.to_string())
            }
            _ => Err(format!("{code}: {body}")),
        }
    };
    let load = {
        let (stop, infer) = (stop.clone(), infer.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<Result<String, String>> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push(infer());
            }
            seen
        })
    };
    let answers_with = |version: &str| {
        let started = Instant::now();
        while infer().as_deref() != Ok(version) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "mymodel@{version} answers"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let refused = tour.sophon(&["deploy", "update", "4", "--version", "2"]);
    assert!(!refused.status.success(), "unapproved update: refused");
    let request = tour.json(&["approval", "request", "mymodel", "2", "production"]);
    let id = request["created"]["approval_request"].to_string();
    for (who, comment) in [(&ann, "eval ok"), (&bob, "load test ok")] {
        let secret = who["secret"].as_str().expect("secret");
        tour.ok(&["approval", "approve", &id, "-c", comment, "--token", secret]);
    }
    tour.ok(&["deploy", "update", "4", "--version", "2", "--wait"]);
    answers_with("2");
    let history = tour.ok(&["deploy", "history", "4"]);
    assert!(
        history.contains("superseded") && history.contains("serving"),
        "{history}"
    );
    tour.ok(&["deploy", "rollback", "4", "--wait"]);
    answers_with("1");
    // Then a canary of it, judged on the load, and promoted.
    tour.ok(&[
        "deploy",
        "canary",
        "4",
        "--version",
        "2",
        "--steps",
        "50,100",
        "--interval",
        "5s",
        "--slo",
        "p99<100ms,errors<1%",
        "--wait",
    ]);
    answers_with("2");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = load.join().expect("the load thread");
    let failed: Vec<&String> = seen.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    assert!(seen.len() > 10, "the load ran: {} requests", seen.len());
    let shown = tour.ok(&["deploy", "show", "4"]);
    assert!(
        shown.contains("mymodel@2") && shown.contains("promote"),
        "{shown}"
    );

    let top = tour.ok(&["top", "--once"]);
    assert!(
        top.contains("mymodel@1") && top.contains("classifier@1"),
        "{top}"
    );
    drop(nodes);

    // Ctrl-C (SIGTERM here) stops it promptly.
    let pid = dev.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let stopping = Instant::now();
    loop {
        if let Ok(Some(status)) = dev.0.try_wait() {
            assert!(status.success(), "dev exited with {status}");
            break;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Path::new(&tour.cwd.join(".sophon-dev")).exists());
}
