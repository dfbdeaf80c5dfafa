//! The admin API over TLS, as an operator runs it: `coordinator run --tls-cert --tls-key`, and
//! the CLI verifying the server against `--ca`. A plain-HTTP admin API on a non-loopback address
//! is refused unless `--insecure-http`.

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

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn sophon(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("SOPHON_LOG", "warn");
    for var in ["SOPHON_SERVER", "SOPHON_TOKEN", "SOPHON_CA"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sophon")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA and a server certificate for 127.0.0.1 that it signed, as PEM files in `dir`.
fn certificates(dir: &Path, name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).expect("issuer");
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    let paths = [
        (format!("{name}-ca.pem"), ca.pem()),
        (format!("{name}-cert.pem"), cert.pem()),
        (format!("{name}-key.pem"), key.serialize_pem()),
    ];
    for (file, pem) in &paths {
        std::fs::write(dir.join(file), pem).expect("write pem");
    }
    let path = |i: usize| dir.join(&paths[i].0).to_string_lossy().into_owned();
    (path(0), path(1), path(2))
}

#[test]
fn the_admin_api_serves_tls_and_the_cli_checks_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, cert, key) = certificates(dir.path(), "api");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let data = dir.path().join("c1");
    let data = data.to_str().expect("utf-8");
    let api = format!("127.0.0.1:{}", free_port());
    let mesh = format!("127.0.0.1:{}", free_udp());
    let out = sophon(
        &[
            "coordinator",
            "init",
            "--data",
            data,
            "--api",
            &api,
            "--mesh",
            &mesh,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let token = text(&out)
        .lines()
        .find_map(|l| l.strip_prefix("Admin token (shown once, keep it): "))
        .expect("admin token")
        .trim()
        .to_string();
    let child = Command::new(BIN)
        .args([
            "coordinator",
            "run",
            "--data",
            data,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ])
        .env("SOPHON_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("run");
    let _running = Running(child);
    let https = format!("https://{api}");
    let env = [
        ("SOPHON_SERVER", https.as_str()),
        ("SOPHON_TOKEN", token.as_str()),
    ];
    let started = Instant::now();
    loop {
        let out = sophon(&["cluster", "status", "--ca", &ca], &env);
        if out.status.success() {
            assert!(text(&out).contains("coordinator"), "{}", text(&out));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never served over TLS: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SOPHON_CA works as --ca does.
    let out = sophon(&["model", "list"], &[env[0], env[1], ("SOPHON_CA", &ca)]);
    assert!(out.status.success(), "{}", text(&out));
    // No CA: a clear error, nothing sent.
    let out = sophon(&["cluster", "status"], &env);
    assert!(!out.status.success());
    assert!(text(&out).contains("--ca"), "{}", text(&out));
    // A CA that did not sign the server's certificate: refused.
    let out = sophon(&["cluster", "status", "--ca", &other_ca], &env);
    assert!(!out.status.success(), "{}", text(&out));
    // Plain HTTP to the TLS port gets nothing.
    let out = sophon(
        &["cluster", "status"],
        &[("SOPHON_SERVER", &format!("http://{api}")), env[1]],
    );
    assert!(!out.status.success(), "{}", text(&out));
}

#[test]
fn plain_http_off_loopback_needs_insecure_http() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("c1");
    let data = data.to_str().expect("utf-8");
    let port = free_port();
    let api = format!("0.0.0.0:{port}");
    let mesh = format!("127.0.0.1:{}", free_udp());
    let out = sophon(
        &[
            "coordinator",
            "init",
            "--data",
            data,
            "--api",
            &api,
            "--mesh",
            &mesh,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = sophon(&["coordinator", "run", "--data", data], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refusing plain HTTP"), "{}", text(&out));
    // With --insecure-http it serves (reached here on loopback).
    let child = Command::new(BIN)
        .args(["coordinator", "run", "--data", data, "--insecure-http"])
        .env("SOPHON_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("run");
    let _running = Running(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "not serving");
        std::thread::sleep(Duration::from_millis(100));
    }
}
