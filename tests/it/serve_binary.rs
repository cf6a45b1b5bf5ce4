//! The `crosskv serve` binary itself: it binds, answers /health 503 then 200 once the
//! model is loaded, serves a completion, and on SIGTERM stops cleanly with exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tiny_model_dir() -> crate::common::Checkpoint {
    crate::common::tiny_with_default_tokenizer()
}

/// A plain HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn serve_binary_becomes_ready_serves_and_exits_zero_on_sigterm() {
    let dir = tiny_model_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crosskv"))
        .args([
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "16MiB",
            "--max-model-len",
            "64",
            "--model",
        ])
        .arg(dir.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(addr) = line.strip_prefix("crosskv: listening on http://") {
            break addr.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>().join("\n"));
    let t0 = Instant::now();
    let mut saw = Vec::new();
    loop {
        let (status, _) = http(port, "GET", "/health", "");
        saw.push(status);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "only 503 before ready");
        assert!(t0.elapsed() < Duration::from_secs(60), "not ready in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    let body = r#"{"model": "x", "prompt": "Hello there", "max_tokens": 4, "temperature": 0}"#;
    let (status, text) = http(port, "POST", "/v1/completions", body);
    // The served name defaults to the --model value, so "x" is unknown: 404 in the OpenAI shape.
    assert_eq!(status, 404, "{text}");
    let models: serde_json::Value = serde_json::from_str(&http(port, "GET", "/v1/models", "").1).unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let body = serde_json::json!({"model": name, "prompt": "Hello there", "max_tokens": 4, "temperature": 0});
    let (status, text) = http(port, "POST", "/v1/completions", &body.to_string());
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t1.elapsed() < Duration::from_secs(30), "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log.join().unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("KV cache:"), "the KV layout is logged at start-up:\n{log}");
    std::io::stderr().flush().ok();
}

#[test]
fn serve_refuses_to_start_when_max_model_len_cannot_fit() {
    let dir = tiny_model_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_crosskv"))
        .args([
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "8KiB",
            "--max-model-len",
            "64",
            "--model",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_model_len") && err.contains("bytes"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
