//! The operators' kit in `docker/`: every query of the provisioned Grafana dashboard
//! names a metric the server exports (crosskv::metrics), the dashboard covers the
//! required topics, and the Prometheus / Grafana / compose / Dockerfile wiring agrees
//! (scrape port and path, datasource uid, dashboard path, build stages, the toolchain
//! of rust-toolchain.toml and the cargo features of Cargo.toml).
//! Reads files only: no network, no docker.

use crosskv::metrics::{KvCacheInfo, Metrics, METRIC_NAMES};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

fn docker_file(rel: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docker").join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&docker_file("grafana/dashboards/crosskv.json")).expect("the dashboard is valid JSON")
}

/// Every panel, rows' nested panels included (rows themselves excluded).
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().into_iter().flatten() {
            if p["type"] != "row" {
                out.push(p);
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["expr"].as_str())
        .collect()
}

/// The `crosskv_*` identifiers of a PromQL expression (quoted label values skipped).
fn metric_idents(expr: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in expr.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("crosskv_"))
        .map(str::to_string)
        .collect()
}

/// The names the server's registry exports as histograms (`# TYPE <name> histogram`).
fn histogram_names() -> BTreeSet<String> {
    let m = Metrics::new(KvCacheInfo {
        layers: 4,
        kv_layers: 2,
        cla_share_factor: Some(2),
        block_size: 16,
        dtype: "f32".into(),
        kv_bytes_per_token: 512,
        non_cla_kv_bytes_per_token: 1024,
        num_blocks: 10,
        block_bytes: 4096,
        capacity_tokens: 80,
    });
    m.render()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .map(str::to_string)
        .collect()
}

/// The exported metric an identifier refers to, or None.
fn resolve(ident: &str, histograms: &BTreeSet<String>) -> Option<String> {
    if METRIC_NAMES.contains(&ident) {
        return Some(ident.to_string());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| ident.strip_suffix(s))
        .find(|base| METRIC_NAMES.contains(base) && histograms.contains(*base))
        .map(str::to_string)
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let d = dashboard();
    let histograms = histogram_names();
    assert!(!histograms.is_empty(), "the registry exports histograms");
    let mut seen = 0;
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?");
        let es = exprs(p);
        assert!(!es.is_empty(), "panel {title:?} has no query");
        for e in es {
            let idents = metric_idents(e);
            assert!(!idents.is_empty(), "panel {title:?}: {e:?} names no crosskv metric");
            for i in idents {
                assert!(
                    resolve(&i, &histograms).is_some(),
                    "panel {title:?}: {i} is not exported by crosskv::metrics (query {e:?})"
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 20, "only {seen} metric references");
    // The identifier scan itself.
    assert_eq!(
        metric_idents(r#"histogram_quantile(0.5, sum by (le) (rate(crosskv_x_bucket{job="crosskv_y"}[5m])))"#),
        vec!["crosskv_x_bucket"]
    );
    assert_eq!(
        resolve("crosskv_time_to_first_token_seconds_bucket", &histograms).as_deref(),
        Some("crosskv_time_to_first_token_seconds")
    );
    assert_eq!(resolve("crosskv_kv_blocks_used_count", &histograms), None);
    assert_eq!(resolve("crosskv_no_such_metric", &histograms), None);
}

/// A required topic and the test a panel covering it passes.
type Topic<'a> = (&'a str, &'a dyn Fn(&Value) -> bool);

#[test]
fn dashboard_covers_every_required_topic() {
    let d = dashboard();
    let ps = panels(&d);
    let uses = |p: &Value, m: &str| exprs(p).iter().any(|e| metric_idents(e).iter().any(|i| i == m));
    let quantile_of = |p: &Value, m: &str, q: &str| {
        let bucket = format!("{m}_bucket");
        exprs(p)
            .iter()
            .any(|e| e.contains(&format!("histogram_quantile({q}")) && metric_idents(e).contains(&bucket))
    };
    let topics: &[Topic] = &[
        ("KV cache usage", &|p| uses(p, "crosskv_kv_cache_usage_perc")),
        ("KV blocks used/total", &|p| {
            uses(p, "crosskv_kv_blocks_used") && uses(p, "crosskv_kv_blocks")
        }),
        ("bytes saved by sharing", &|p| {
            uses(p, "crosskv_kv_bytes_saved_by_sharing")
        }),
        ("capacity tokens", &|p| uses(p, "crosskv_kv_cache_capacity_tokens")),
        ("capacity bytes", &|p| uses(p, "crosskv_kv_cache_bytes")),
        ("KV layout", &|p| uses(p, "crosskv_kv_cache_info")),
        ("running/waiting requests", &|p| {
            uses(p, "crosskv_num_requests_running") && uses(p, "crosskv_num_requests_waiting")
        }),
        ("TTFT p50/p99", &|p| {
            quantile_of(p, "crosskv_time_to_first_token_seconds", "0.5")
                && quantile_of(p, "crosskv_time_to_first_token_seconds", "0.99")
        }),
        ("ITL p50/p99", &|p| {
            quantile_of(p, "crosskv_inter_token_latency_seconds", "0.5")
                && quantile_of(p, "crosskv_inter_token_latency_seconds", "0.99")
        }),
        ("e2e latency", &|p| {
            quantile_of(p, "crosskv_e2e_request_latency_seconds", "0.99")
        }),
        ("queue time", &|p| {
            quantile_of(p, "crosskv_request_queue_time_seconds", "0.99")
        }),
        ("token rates", &|p| {
            uses(p, "crosskv_prompt_tokens_total") && uses(p, "crosskv_generation_tokens_total")
        }),
        ("preemptions", &|p| uses(p, "crosskv_num_preemptions_total")),
        ("prefix cache hit rate", &|p| {
            uses(p, "crosskv_prefix_cache_hits_total") && uses(p, "crosskv_prefix_cache_queries_total")
        }),
    ];
    for (topic, has) in topics {
        assert!(ps.iter().any(|p| has(p)), "no dashboard panel for {topic}");
    }
}

/// `key: value` of the first line (trimmed) starting with `key:`.
fn yaml_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().trim_matches('"'))
        .next()
}

/// The lines of the block that starts at `header` (matched trimmed) and runs while
/// lines are indented deeper than it.
fn yaml_block<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = text.lines().skip_while(|l| l.trim() != header);
    let head = lines.next().unwrap_or_else(|| panic!("no `{header}` block"));
    let base = indent(head);
    lines
        .take_while(|l| l.trim().is_empty() || indent(l) > base)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .collect()
}

#[test]
fn panels_use_the_provisioned_datasource() {
    let ds = docker_file("grafana/provisioning/datasources/prometheus.yml");
    let uid = yaml_value(&ds, "uid").expect("the provisioned datasource has a uid");
    assert!(yaml_value(&ds, "- name").is_some(), "the datasource has a name");
    assert_eq!(yaml_value(&ds, "type"), Some("prometheus"));
    assert_eq!(yaml_value(&ds, "url"), Some("http://prometheus:9090"));

    let d = dashboard();
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "dashboard uid");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "dashboard title");
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion");
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {}: gridPos.{k}", p["title"]);
        }
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel {} too wide",
            p["title"]
        );
    }
    for p in panels(&d) {
        let title = &p["title"];
        assert_eq!(p["datasource"]["uid"].as_str(), Some(uid), "panel {title} datasource");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no targets");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"].as_str(),
                Some(uid),
                "panel {title} target datasource"
            );
            assert_eq!(t["datasource"]["type"].as_str(), Some("prometheus"));
            assert!(t["refId"].as_str().is_some(), "panel {title} target refId");
        }
    }
}

#[test]
fn prometheus_scrapes_metrics_on_the_port_compose_exposes() {
    let prom = docker_file("prometheus/prometheus.yml");
    assert_eq!(yaml_value(&prom, "metrics_path"), Some("/metrics"));
    assert_eq!(yaml_value(&prom, "scrape_interval"), Some("5s"));
    let targets = yaml_value(&prom, "- targets").expect("a static target");
    let target = targets
        .trim_matches(|c| c == '[' || c == ']' || c == ' ')
        .trim_matches('"');
    let (host, port) = target.split_once(':').expect("host:port");
    assert_eq!(host, "crosskv", "scrapes the compose service");

    let compose = docker_file("compose.yml");
    let service = yaml_block(&compose, "crosskv:");
    let ports: Vec<&str> = service
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|p| p.trim_matches('"'))
        .filter(|p| p.contains(':') && p.chars().all(|c| c.is_ascii_digit() || c == ':'))
        .collect();
    assert!(
        ports.iter().any(|p| p.rsplit(':').next() == Some(port)),
        "compose publishes container port {port} of crosskv: {ports:?}"
    );
    assert!(
        ports.iter().any(|p| p.ends_with(":50051")),
        "gRPC port published: {ports:?}"
    );
    let command = service
        .iter()
        .find(|l| l.trim().starts_with("command:"))
        .expect("crosskv command");
    assert!(
        command.contains(&format!(r#""--port", "{port}""#)),
        "compose serves on {port}: {command}"
    );
    assert!(service.iter().any(|l| l.contains("dockerfile: docker/Dockerfile")));
    assert!(
        service.iter().any(|l| l.contains(":/home/crosskv/.cache")),
        "model cache volume"
    );

    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let text = docker_file(dockerfile);
        let expose = text.lines().find(|l| l.starts_with("EXPOSE ")).expect("EXPOSE");
        assert!(expose.split_whitespace().any(|p| p == port), "{dockerfile}: {expose}");
        let cmd = text.lines().find(|l| l.starts_with("CMD ")).expect("CMD");
        assert!(cmd.contains(&format!(r#""--port", "{port}""#)), "{dockerfile}: {cmd}");
        assert!(
            text.contains(&format!("127.0.0.1:{port}/health")),
            "{dockerfile}: HEALTHCHECK on /health"
        );
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboard() {
    let compose = docker_file("compose.yml");
    let grafana = yaml_block(&compose, "grafana:");
    let mount = grafana
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- ./grafana/dashboards:"))
        .next()
        .expect("grafana mounts docker/grafana/dashboards");
    let mount = mount.trim_end_matches(":ro");
    let provider = docker_file("grafana/provisioning/dashboards/crosskv.yml");
    assert_eq!(yaml_value(&provider, "path"), Some(mount));
    assert!(grafana
        .iter()
        .any(|l| l.trim() == "- ./grafana/provisioning:/etc/grafana/provisioning:ro"));
    assert!(grafana
        .iter()
        .any(|l| l.contains("GF_AUTH_ANONYMOUS_ENABLED: \"true\"")));
    assert!(grafana.iter().any(|l| l.contains("GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer")));
}

#[test]
fn dockerfiles_copy_from_stages_they_define() {
    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let text = docker_file(dockerfile);
        let stages: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .filter_map(|l| l.split(" AS ").nth(1))
            .map(str::trim)
            .collect();
        assert_eq!(stages, ["build", "runtime"], "{dockerfile}");
        for l in text.lines().filter(|l| l.starts_with("COPY --from=")) {
            let stage = l["COPY --from=".len()..].split_whitespace().next().unwrap();
            assert!(stages.contains(&stage), "{dockerfile}: {l}");
        }
        assert!(text.contains(r#"ENTRYPOINT ["crosskv"]"#), "{dockerfile}");
        assert!(
            text.contains("target-cpu=${RUST_TARGET_CPU}"),
            "{dockerfile}: portable target-cpu"
        );
        // Non-root by number (a runtime checks runAsNonRoot without /etc/passwd), the
        // uid the image's `useradd` gives user crosskv.
        let user = text
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{dockerfile}: no USER"));
        let uid: u32 = user
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{dockerfile}: USER {user} is not a uid"));
        assert_ne!(uid, 0, "{dockerfile}: runs as root");
        assert!(
            text.contains(&format!("useradd --create-home --uid {uid} ")),
            "{dockerfile}: USER {uid} is not the uid of user crosskv"
        );
    }
    assert!(docker_file("Dockerfile.cuda").contains(r#""--device", "cuda"]"#));
}

/// The default `value` of `ARG NAME=value` in a Dockerfile.
fn arg_default<'a>(dockerfile: &'a str, name: &str) -> Option<&'a str> {
    dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG ")?.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn dockerfiles_use_the_pinned_toolchain_and_defined_features() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let toolchain = std::fs::read_to_string(root.join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel")?.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"'))
        .expect("rust-toolchain.toml channel");
    let cargo_toml = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let features = cargo_toml.split("[features]").nth(1).expect("[features]");
    let features = features.split("\n[").next().unwrap();
    let defined = |f: &str| features.lines().any(|l| l.starts_with(&format!("{f} = ")));

    for dockerfile in ["Dockerfile", "Dockerfile.cuda"] {
        let text = docker_file(dockerfile);
        assert_eq!(arg_default(&text, "RUST_VERSION"), Some(channel), "{dockerfile}");
        assert!(!text.contains("stable"), "{dockerfile}: a floating toolchain");
    }
    let cpu = docker_file("Dockerfile");
    assert!(cpu.contains("FROM rust:${RUST_VERSION}-bookworm AS build"));
    assert!(!cpu.contains("--features"), "the CPU image builds the default features");
    let cuda = docker_file("Dockerfile.cuda");
    assert!(cuda.contains("--default-toolchain ${RUST_VERSION}"));
    assert!(cuda.contains("--features ${CARGO_FEATURES}"));
    let default_features = arg_default(&cuda, "CARGO_FEATURES").expect("ARG CARGO_FEATURES");
    assert_eq!(default_features, "cuda");
    for f in ["cuda", "nccl"] {
        assert!(defined(f), "Cargo.toml has no `{f}` feature");
        assert!(cuda.contains(&format!("`{f}`")), "Dockerfile.cuda documents `{f}`");
    }
}
