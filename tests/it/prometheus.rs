//! The operators' kit against a real Prometheus (Debian's `prometheus` and `promtool`,
//! skipped with a note where they are not installed): `promtool` finds no problem in a
//! live `/metrics` nor in the Prometheus configs, a Prometheus scraping a live server
//! sees it up, and every query of every panel of the provisioned Grafana dashboards
//! (`docker/grafana/dashboards/*.json`) returns data once real traffic has been
//! scraped: counters' rates positive, latency quantiles finite.

use crate::common::Rng;
use crate::http::{start_model, Server, Setup, VOCAB};
use crosskv::engine::Fault;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// What the dashboards' Grafana variables stand for here: the rate window must span
/// the scrape before the traffic and the one after it.
const GRAFANA_VARIABLES: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "1m"),
    ("__range", "1m"),
    ("job", "crosskv"),
];

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on the loopback nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `promtool ARGS` with `stdin` fed in; its exit status and everything it printed.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(PROMTOOL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// A 4-layer model whose layers share KV in pairs, with a cache of 4 blocks a KV slot
/// (64 tokens): a few requests of 15-token prompts run out of blocks two tokens in, so
/// some are preempted, and the dashboard's preemption rate has something to show.
async fn start_small_cla() -> Server {
    let ck = crate::http::small_cla_checkpoint();
    let m = ck.load();
    let setup = Setup {
        max_model_len: 64,
        kv_cache_bytes: 4 * m.layout().bytes_for_tokens(16, 16),
        ..Default::default()
    };
    start_model(setup, ck, m).await
}

/// One completion, streamed or not, that must succeed.
async fn complete(s: &Server, body: Value, stream: bool) {
    if stream {
        let mut body = body;
        body["stream"] = json!(true);
        let events = s.stream("/v1/completions", body).await;
        assert!(events.iter().any(|e| e["choices"][0]["finish_reason"].is_string()));
    } else {
        let (st, r) = s.post("/v1/completions", body).await;
        assert_eq!(st, 200, "{r}");
    }
}

/// Traffic that moves every counter and histogram the dashboards read: one prompt
/// twice (the second finds its full blocks in the prefix cache), then twelve requests
/// at once, a third of them streamed, with the first step stalled so they all queue
/// and share the small cache (preemptions).
async fn drive_traffic(s: &Server) {
    let mut rng = Rng::new(11);
    let repeated = json!({"prompt": rng.tokens(40, VOCAB), "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    complete(s, repeated.clone(), false).await;
    complete(s, repeated, true).await;
    let burst: Vec<Value> = (0..12)
        .map(
            |i| json!({"prompt": rng.tokens(15, VOCAB), "max_tokens": 8 + i % 5, "temperature": 0, "ignore_eos": true}),
        )
        .collect();
    s.handle.inject_fault(Fault::StallStep(Duration::from_millis(300)));
    futures_util::future::join_all(burst.into_iter().enumerate().map(|(i, b)| complete(s, b, i % 3 == 0))).await;
    s.wait_idle().await;
    for counter in ["crosskv_num_preemptions_total", "crosskv_prefix_cache_hits_total"] {
        assert!(s.metric(counter).await > 0.0, "the traffic did not move {counter}");
    }
}

/// Prometheus' HTTP API.
#[derive(Clone)]
struct PrometheusApi {
    base: String,
    client: reqwest::Client,
}

impl PrometheusApi {
    /// The `data` of an instant query, which must succeed.
    async fn query(&self, expr: &str) -> Value {
        let r = self
            .client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], "success", "query {expr:?}: {body}");
        body["data"].clone()
    }

    /// The value of an instant query that returns exactly one series.
    async fn value(&self, expr: &str) -> Option<f64> {
        match self.query(expr).await["result"].as_array().map(Vec::as_slice) {
            Some([one]) => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The active scrape targets.
    async fn targets(&self) -> Vec<Value> {
        let r = self.client.get(format!("{}/api/v1/targets", self.base)).send().await;
        let body: Value = r.unwrap().json().await.unwrap();
        assert_eq!(body["status"], "success", "{body}");
        body["data"]["activeTargets"].as_array().cloned().unwrap_or_default()
    }
}

/// A Prometheus on a free loopback port scraping `target` every second, its TSDB and
/// log in a temp dir (the directory outlives the process: fields drop in order).
struct Prometheus {
    process: Killed,
    api: PrometheusApi,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn config(target: &str) -> String {
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: crosskv\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        )
    }

    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, Self::config(target)).unwrap();
        let (ok, report) = promtool(&["check", "config", config.to_str().unwrap()], "");
        assert!(ok, "promtool check config on the generated config:\n{report}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut p = Prometheus {
            process: Killed(child),
            api: PrometheusApi {
                base: format!("http://{listen}"),
                // Every call to Prometheus bounded, so a stuck one fails the test.
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap(),
            },
            dir,
        };
        p.wait_until("ready", Duration::from_secs(30), |api| async move {
            let r = api.client.get(format!("{}/-/ready", api.base)).send().await;
            r.is_ok_and(|r| r.status().is_success())
        })
        .await;
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Polls `done` every 100 ms until it holds; panics with Prometheus' log after
    /// `limit` or if Prometheus exits.
    async fn wait_until<F, Fut>(&mut self, what: &str, limit: Duration, done: F)
    where
        F: Fn(PrometheusApi) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let t0 = Instant::now();
        loop {
            if done(self.api.clone()).await {
                return;
            }
            if let Ok(Some(status)) = self.process.0.try_wait() {
                panic!("prometheus exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                t0.elapsed() < limit,
                "prometheus not {what} after {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `docker/<rel>`.
fn docker_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker").join(rel)
}

/// Every `expr` of every panel target (rows' nested panels included) of every
/// dashboard in `docker/grafana/dashboards`, with the panel's title and the file's name.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &Value, file: &str, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("{file}: {}", p["title"]), e.to_string()));
                }
            }
            walk(&p["panels"], file, out);
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(docker_path("grafana/dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in docker/grafana/dashboards");
    let mut out = Vec::new();
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        walk(&d["panels"], &f.file_name().unwrap().to_string_lossy(), &mut out);
    }
    out
}

/// `expr` with the Grafana variables (`$name` and `${name}`) replaced; a variable this
/// test does not know fails the test rather than reach Prometheus as a syntax error.
fn substitute(expr: &str, instance: &str) -> String {
    let mut e = expr.to_string();
    let instance_var = [("instance", instance)];
    // Longest names first, so `$__rate_interval` is not read as `$__r...` of another.
    let mut vars: Vec<(&str, &str)> = GRAFANA_VARIABLES.iter().copied().chain(instance_var).collect();
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in vars {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !e.contains('$'),
        "a Grafana variable this test does not know in {expr:?}"
    );
    e
}

#[test]
fn grafana_variables_are_substituted() {
    assert_eq!(
        substitute(
            r#"rate(x{job="$job",instance="${instance}"}[$__rate_interval]) + y[$__interval]"#,
            "h:1"
        ),
        r#"rate(x{job="crosskv",instance="h:1"}[1m]) + y[1m]"#
    );
}

#[test]
fn docker_prometheus_configs_pass_promtool() {
    if !Path::new(PROMTOOL).exists() {
        eprintln!("skipped: {PROMTOOL} is not installed (apt-get install prometheus)");
        return;
    }
    let dir = docker_path("prometheus");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "yml" || x == "yaml") {
            let (ok, report) = promtool(&["check", "config", path.to_str().unwrap()], "");
            assert!(ok, "promtool check config {}:\n{report}", path.display());
            checked += 1;
        }
    }
    assert!(checked > 0, "no Prometheus config in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_server_and_answers_every_dashboard_query() {
    for tool in [PROMETHEUS, PROMTOOL] {
        if !Path::new(tool).exists() {
            eprintln!("skipped: {tool} is not installed (apt-get install prometheus)");
            return;
        }
    }
    let s = start_small_cla().await;
    let target = s.addr.to_string();
    let mut prom = Prometheus::start(&target).await;

    // A scrape before the traffic, so every rate window holds the counters' rise.
    prom.wait_until("scraping", Duration::from_secs(20), |api| async move {
        api.value("up{job=\"crosskv\"}").await == Some(1.0)
    })
    .await;
    drive_traffic(&s).await;

    // promtool lints what Prometheus scrapes, with every histogram and label filled.
    let (st, exposition) = s.get("/metrics").await;
    assert_eq!(st, 200);
    assert!(exposition.contains("# TYPE "), "an empty exposition: {exposition:?}");
    let (ok, report) = promtool(&["check", "metrics"], &exposition);
    assert!(ok && report.trim().is_empty(), "promtool check metrics:\n{report}");

    // A scrape after the traffic: Prometheus holds the server's final request count.
    let requests = s.metric("crosskv_e2e_request_latency_seconds_count").await;
    assert_eq!(requests, 14.0);
    prom.wait_until("scraped after the traffic", Duration::from_secs(20), |api| async move {
        api.value("crosskv_e2e_request_latency_seconds_count").await == Some(requests)
    })
    .await;
    let targets = prom.api.targets().await;
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0]["health"], "up", "{}", targets[0]);
    assert_eq!(targets[0]["lastError"], "", "{}", targets[0]);

    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} dashboard queries", queries.len());
    for (panel, expr) in queries {
        let promql = substitute(&expr, &target);
        let data = prom.api.query(&promql).await;
        let result = data["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{panel}: {promql}: {data}"));
        assert!(!result.is_empty(), "{panel}: {promql} returned no series");
        for series in result {
            let v: f64 = series["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{panel}: {promql}: {series}"));
            assert!(v.is_finite(), "{panel}: {promql} = {v}");
            // Every rate the dashboards plot (tokens, preemptions, prefix hits, the
            // latency quantiles over bucket rates) saw the traffic in its window.
            if promql.contains("rate(") {
                assert!(v > 0.0, "{panel}: {promql} = {v}, though the traffic moved it");
            }
        }
    }
}
