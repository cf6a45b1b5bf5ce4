//! Two `crosskv serve` replicas behind sglang-router's cache-aware policy, all on
//! loopback (docs/deployment.md): the router registers both as workers under the served
//! model name, spreads unrelated prompts sent together over both, and sends prompts that share a long
//! prefix to one replica, whose prefix-cache hit counter rises while the other's does not.
//! Skipped, saying so, where the `sglang_router` Python package is not installed.

use crate::common::{python, python_imports, Checkpoint, Tiny};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "tiny";

/// Children killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tiny random llama with the default model's tokenizer and room for prompts of a few
/// hundred tokens, so a shared prefix spans several KV blocks.
fn model_dir() -> Checkpoint {
    crate::common::with_default_tokenizer(Tiny::new(2, 4, 2, 8, 32, 49152).seed(7).max_positions(512))
}

/// Starts `crosskv serve` on an ephemeral port; returns the child and its port.
fn serve(model: &Path) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crosskv"))
        .args([
            "serve",
            "--port",
            "0",
            "--kv-cache-memory",
            "16MiB",
            "--max-model-len",
            "512",
        ])
        .args(["--served-model-name", MODEL, "--model"])
        .arg(model)
        .env("CROSSKV_LOG", "warn")
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(addr) = line.strip_prefix("crosskv: listening on http://") {
            break addr.rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    (child, port)
}

/// A port nothing listens on now (the router takes ports, not port 0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A counter's value in a Prometheus text page.
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, limit: Duration, mut f: impl FnMut() -> F) {
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_router_spreads_requests_and_keeps_a_shared_prefix_on_one_replica() {
    if !python_imports(&["sglang_router.launch_router"]) {
        eprintln!(
            "skipped: {} lacks the sglang_router package (pip install sglang-router==0.3.2)",
            python()
        );
        return;
    }
    let ckpt = model_dir();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (a, port_a) = serve(ckpt.path());
    let (b, port_b) = serve(ckpt.path());
    let mut procs = Procs(vec![a, b]);
    let workers = [port_a, port_b].map(|p| format!("http://127.0.0.1:{p}"));
    for w in &workers {
        let url = format!("{w}/health");
        wait_until("replica healthy", Duration::from_secs(60), || async {
            http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    let router_port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    procs.0.push(
        Command::new(python())
            .args([
                "-m",
                "sglang_router.launch_router",
                "--host",
                "127.0.0.1",
                "--policy",
                "cache_aware",
            ])
            .args(["--port", &router_port.to_string()])
            .args(["--prometheus-port", &free_port().to_string()])
            .args(["--log-level", "warn", "--worker-urls"])
            .args(&workers)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );
    let router = format!("http://127.0.0.1:{router_port}");
    let router_log = || std::fs::read_to_string(log.path()).unwrap_or_default();

    // The router registers each replica under the name its /server_info gives.
    let workers_url = format!("{router}/workers");
    wait_until("both replicas registered", Duration::from_secs(30), || async {
        let Ok(r) = http.get(&workers_url).send().await else {
            return false;
        };
        let v: Value = r.json().await.unwrap_or_default();
        let list = v["workers"].as_array().cloned().unwrap_or_default();
        list.len() == 2 && list.iter().all(|w| w["is_healthy"] == true && w["model_id"] == MODEL)
    })
    .await;

    let complete = |prompt: String, max_tokens: u32| {
        let (http, url) = (http.clone(), format!("{router}/v1/completions"));
        async move {
            let body = json!({
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": true,
            });
            let r = http.post(&url).json(&body).send().await.unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap();
            assert_eq!(status, 200, "{v}");
            v
        }
    };
    let scrape = || async {
        let mut out = Vec::new();
        for w in &workers {
            let page = http
                .get(format!("{w}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            out.push((
                counter(&page, "crosskv_e2e_request_latency_seconds_count"),
                counter(&page, "crosskv_prefix_cache_hits_total"),
            ));
        }
        out
    };

    // Unrelated prompts (no common prefix) sent together: each goes to the replica with
    // the fewest requests in flight, so both get some.
    let topics = ["apples", "boats", "clouds", "dogs", "engines", "forests"];
    let together: Vec<_> = topics
        .iter()
        .map(|t| {
            tokio::spawn(complete(
                format!("{t} are the subject of this short note about {t}."),
                64,
            ))
        })
        .collect();
    for r in together {
        r.await.unwrap();
    }
    let spread = scrape().await;
    assert!(
        spread.iter().all(|&(requests, _)| requests >= 1.0),
        "requests per replica {spread:?}\nrouter log:\n{}",
        router_log()
    );
    assert_eq!(spread.iter().map(|&(r, _)| r).sum::<f64>(), topics.len() as f64);

    // Prompts sharing a prefix of several KV blocks, one after another: the first goes to
    // either replica (both idle), the rest follow it, and only that replica finds the
    // prefix in its cache.
    let prefix = "The quarterly report of the northern lighthouse keepers, read aloud at the \
                  harbour meeting, described the storms of the season, the state of the lamps, \
                  the oil delivered by the supply boat, and the names of every ship that passed. "
        .repeat(2);
    complete(format!("{prefix}Question one: how many ships?"), 2).await;
    let before = scrape().await;
    let first = if before[0].0 > spread[0].0 { 0 } else { 1 };
    for q in ["two: which storms?", "three: how much oil?", "four: who read it?"] {
        complete(format!("{prefix}Question {q}"), 2).await;
    }
    let after = scrape().await;
    let other = 1 - first;
    assert_eq!(
        after[first].0 - before[first].0,
        3.0,
        "all shared-prefix requests on one replica: {after:?}"
    );
    assert_eq!(after[other].0, before[other].0, "none on the other: {after:?}");
    assert!(
        after[first].1 >= before[first].1 + 3.0 * 32.0,
        "its prefix-cache hits rose by at least two blocks a request: {before:?} -> {after:?}"
    );
    assert_eq!(
        after[other].1, before[other].1,
        "the other's did not: {before:?} -> {after:?}"
    );
}
