//! Served decode: the real server (`crosskv serve`, started as a child process) driven
//! over HTTP by B concurrent streaming clients, beside the engine's own timing of the
//! same steps.
//!
//!   cargo build --release && cargo bench --bench serve_decode -- --batches 1,8 -- [serve flags]
//!
//! For each batch B, B completions (random prompt ids, greedy unless `--temperature`,
//! `ignore_eos`, streamed) are sent at once, twice: asking for N1 and for N2 new tokens,
//! with fresh prompts each time so the prefix cache never hits. Then:
//!
//! - **served step** = (wall(N2) − wall(N1)) / (N2 − N1): what one more decode step costs
//!   a client; prefill, connection set-up and the HTTP round trip cancel;
//! - **engine forward** per decode step, from the server's own counters
//!   (`crosskv_engine_step_phase_seconds_total`, differenced the same way): the batched
//!   forward and the logits fetch, i.e. the device's work on CUDA; **host** is the rest
//!   of the step (scheduling, inputs, sampling, detokenizing, events, status), time the
//!   device waits through; **served / forward** is the ratio the serving path adds;
//! - served tok/s = B·N2 / wall(N2) (prefill included), and TTFT and inter-token gaps
//!   (p50/p99) seen by the N2 run's streaming clients.
//!
//! Every request must get exactly its N tokens (the stream's `usage`), or the run fails.

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Args {
    /// The crosskv binary (default: `crosskv` beside this benchmark's directory, i.e.
    /// target/release/crosskv).
    #[arg(long)]
    server: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 8199)]
    port: u16,
    /// Concurrent requests per run.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// New tokens of the short run.
    #[arg(long, default_value_t = 16)]
    n1: usize,
    /// New tokens of the long run.
    #[arg(long, default_value_t = 64)]
    n2: usize,
    /// Prompt ids are drawn from `1000..1000 + vocab_range` (inside any real vocabulary).
    #[arg(long, default_value_t = 20_000)]
    vocab_range: u32,
    /// Seconds to wait for the server's /health.
    #[arg(long, default_value_t = 900)]
    startup_timeout: u64,
    /// Where the server's log goes (default: discarded).
    #[arg(long)]
    server_log: Option<std::path::PathBuf>,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Print one JSON object per batch as well.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Flags for `crosskv serve` (after `--`).
    #[arg(last = true)]
    serve_args: Vec<String>,
}

/// The server process, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one streamed request saw.
struct Timed {
    ttft: f64,
    gaps: Vec<f64>,
}

/// One run: B requests of `n` tokens sent at once.
struct Run {
    wall: f64,
    reqs: Vec<Timed>,
    metrics: HashMap<String, f64>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `name value` lines of the Prometheus text (labels kept in the name).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A xorshift stream of prompt ids.
fn prompt(seed: u64, len: usize, range: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            1000 + (s % range as u64) as u32
        })
        .collect()
}

async fn one(client: &reqwest::Client, url: &str, ids: Vec<u32>, n: usize, sampling: (f32, f32)) -> Result<Timed> {
    let body = json!({"prompt": ids, "max_tokens": n, "temperature": sampling.0, "top_p": sampling.1,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let t0 = Instant::now();
    let resp = client.post(url).json(&body).send().await?;
    if !resp.status().is_success() {
        bail!("HTTP {}: {}", resp.status(), resp.text().await.unwrap_or_default());
    }
    let mut stream = resp.bytes_stream();
    let (mut buf, mut times, mut completion_tokens) = (Vec::<u8>::new(), Vec::new(), None);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let Some(data) = std::str::from_utf8(&event)?.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).context("a stream event")?;
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                times.push(t0.elapsed().as_secs_f64());
            }
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                completion_tokens = Some(u as usize);
            }
        }
    }
    if completion_tokens != Some(n) || times.is_empty() {
        bail!("a request asked for {n} tokens and got {completion_tokens:?}");
    }
    Ok(Timed {
        ttft: times[0],
        gaps: times.windows(2).map(|w| w[1] - w[0]).collect(),
    })
}

async fn scrape(client: &reqwest::Client, base: &str) -> Result<HashMap<String, f64>> {
    Ok(parse_metrics(
        &client.get(format!("{base}/metrics")).send().await?.text().await?,
    ))
}

async fn run(client: &reqwest::Client, base: &str, a: &Args, batch: usize, n: usize, seed: u64) -> Result<Run> {
    let before = scrape(client, base).await?;
    let url = format!("{base}/v1/completions");
    let start = Instant::now();
    let reqs = futures_util::future::join_all((0..batch).map(|i| {
        one(
            client,
            &url,
            prompt(seed * 100_003 + i as u64, a.prompt_tokens, a.vocab_range),
            n,
            (a.temperature, a.top_p),
        )
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let wall = start.elapsed().as_secs_f64();
    let after = scrape(client, base).await?;
    let metrics = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect();
    Ok(Run { wall, reqs, metrics })
}

fn phase(m: &HashMap<String, f64>, p: &str) -> f64 {
    m.get(&format!("crosskv_engine_step_phase_seconds_total{{phase=\"{p}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.n2 <= a.n1 {
        bail!("--n2 must be larger than --n1");
    }
    let server = match &a.server {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(|d| d.parent())
            .context("the benchmark's directory")?
            .join("crosskv"),
    };
    let log = match &a.server_log {
        Some(p) => Stdio::from(std::fs::File::create(p)?),
        None => Stdio::null(),
    };
    let child = Command::new(&server)
        .arg("serve")
        .args(["--port", &a.port.to_string()])
        .args(&a.serve_args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", server.display()))?;
    let mut srv = Server(child);
    let base = format!("http://127.0.0.1:{}", a.port);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
        let t = Instant::now();
        loop {
            if let Some(status) = srv.0.try_wait()? {
                bail!("the server exited during start-up ({status})");
            }
            let ok = client.get(format!("{base}/health")).send().await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if t.elapsed() > Duration::from_secs(a.startup_timeout) {
                bail!("the server did not become healthy in {} s", a.startup_timeout);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("server up in {:.1} s: {} serve {}", t.elapsed().as_secs_f64(), server.display(), a.serve_args.join(" "));
        // Warm-up: the first requests pay for lazy set-up (kernels, pools).
        run(&client, &base, &a, a.batches.iter().copied().max().unwrap_or(1), 4, 1).await?;
        println!(
            "| batch | prompt | served step ms | engine forward ms/step | of it queueing | host ms/step | served / forward | served tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        for (i, &b) in a.batches.iter().enumerate() {
            let seed = 10 + 2 * i as u64;
            // Each batch's own warm-up, as long as the long run: CUDA graphs are captured
            // per batch size and table width on first use, which must not fall in one
            // run only.
            run(&client, &base, &a, b, a.n2, 1000 + seed).await?;
            let r1 = run(&client, &base, &a, b, a.n1, seed).await?;
            let r2 = run(&client, &base, &a, b, a.n2, seed + 1).await?;
            let dn = (a.n2 - a.n1) as f64;
            let served = (r2.wall - r1.wall) / dn;
            let steps = r2.metrics.get("crosskv_engine_steps_total").copied().unwrap_or(0.0)
                - r1.metrics.get("crosskv_engine_steps_total").copied().unwrap_or(0.0);
            let per_step = |p: &str| (phase(&r2.metrics, p) - phase(&r1.metrics, p)) / steps.max(1.0);
            let queue = per_step("forward");
            let forward = queue + per_step("logits");
            let host: f64 = ["schedule", "prepare", "update", "publish"].iter().map(|p| per_step(p)).sum();
            let mut ttft: Vec<f64> = r2.reqs.iter().map(|r| r.ttft).collect();
            let mut gaps: Vec<f64> = r2.reqs.iter().flat_map(|r| r.gaps.iter().copied()).collect();
            let tok_s = (b * a.n2) as f64 / r2.wall;
            let (t50, t99, g50, g99) = (
                percentile(&mut ttft, 0.5),
                percentile(&mut ttft, 0.99),
                percentile(&mut gaps, 0.5),
                percentile(&mut gaps, 0.99),
            );
            println!(
                "| {b} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} / {:.0} | {:.1} / {:.1} |",
                a.prompt_tokens,
                served * 1e3,
                forward * 1e3,
                queue * 1e3,
                host * 1e3,
                served / forward,
                tok_s,
                t50 * 1e3,
                t99 * 1e3,
                g50 * 1e3,
                g99 * 1e3
            );
            if a.json {
                let phases: serde_json::Map<String, Value> = ["schedule", "prepare", "forward", "logits", "update", "publish"]
                    .iter()
                    .map(|p| (p.to_string(), json!(per_step(p) * 1e3)))
                    .collect();
                println!(
                    "{}",
                    json!({"bench": "serve_decode", "batch": b, "prompt_tokens": a.prompt_tokens,
                        "n1": a.n1, "n2": a.n2, "wall_n1_s": r1.wall, "wall_n2_s": r2.wall,
                        "served_step_ms": served * 1e3, "engine_forward_ms": forward * 1e3,
                        "host_ms": host * 1e3, "decode_steps": steps,
                        "phases_ms": phases,
                        "served_tok_s": tok_s, "ttft_p50_ms": t50 * 1e3, "ttft_p99_ms": t99 * 1e3,
                        "itl_p50_ms": g50 * 1e3, "itl_p99_ms": g99 * 1e3,
                        "serve_args": a.serve_args})
                );
            }
        }
        Ok(())
    })
}
