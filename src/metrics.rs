//! Every Prometheus metric crosskv exports, declared in this one module: names follow
//! vLLM's (prefix `crosskv_`) so existing dashboards port over, plus the CLA-specific
//! KV metrics (docs/serving.md). Prometheus naming wins where the two differ: `_total`
//! ends counter names and nothing else, so vLLM's `iteration_tokens_total` histogram is
//! `crosskv_iteration_tokens` here.

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every exported metric name (histograms add `_bucket`, `_sum`, `_count`).
pub const METRIC_NAMES: &[&str] = &[
    "crosskv_kv_cache_usage_perc",
    "crosskv_num_requests_running",
    "crosskv_num_requests_waiting",
    "crosskv_time_to_first_token_seconds",
    "crosskv_inter_token_latency_seconds",
    "crosskv_e2e_request_latency_seconds",
    "crosskv_request_queue_time_seconds",
    "crosskv_prompt_tokens_total",
    "crosskv_generation_tokens_total",
    "crosskv_num_preemptions_total",
    "crosskv_prefix_cache_queries_total",
    "crosskv_prefix_cache_hits_total",
    "crosskv_kv_cache_info",
    "crosskv_kv_cache_capacity_tokens",
    "crosskv_kv_cache_bytes",
    "crosskv_kv_cache_used_bytes",
    "crosskv_kv_blocks",
    "crosskv_kv_blocks_used",
    "crosskv_kv_bytes_saved_by_sharing",
    "crosskv_engine_steps_total",
    "crosskv_engine_step_duration_seconds",
    "crosskv_engine_step_phase_seconds_total",
    "crosskv_iteration_tokens",
];

/// The parts of an engine step, timed separately (`crosskv_engine_step_phase_seconds_total`):
/// where a step's time goes, and so how long the device waits for the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// The scheduler's choice of this step's work, and the status published with it.
    Schedule,
    /// The step's inputs built from the scheduled sequences.
    Prepare,
    /// The batched forward: on the CPU computed, on CUDA queued (inputs uploaded,
    /// kernels or a graph launched).
    Forward,
    /// Structured outputs: the constrained requests' allowed tokens, computed on the
    /// host after the forward is queued (on CUDA, while the device runs it).
    Masks,
    /// The logits rows the host needs, fetched: on CUDA this waits for the device.
    Logits,
    /// Sampling, stop checks, detokenizing and the events to each request.
    Update,
    /// The status and gauges published after the step.
    Publish,
}

impl StepPhase {
    pub const ALL: [StepPhase; 7] = [
        StepPhase::Schedule,
        StepPhase::Prepare,
        StepPhase::Forward,
        StepPhase::Masks,
        StepPhase::Logits,
        StepPhase::Update,
        StepPhase::Publish,
    ];
    pub fn label(self) -> &'static str {
        match self {
            StepPhase::Schedule => "schedule",
            StepPhase::Prepare => "prepare",
            StepPhase::Forward => "forward",
            StepPhase::Masks => "masks",
            StepPhase::Logits => "logits",
            StepPhase::Update => "update",
            StepPhase::Publish => "publish",
        }
    }
}

/// The static facts behind `crosskv_kv_cache_info` and the capacity gauges.
#[derive(Debug, Clone)]
pub struct KvCacheInfo {
    pub layers: usize,
    pub kv_layers: usize,
    pub cla_share_factor: Option<usize>,
    pub block_size: usize,
    pub dtype: String,
    pub kv_bytes_per_token: usize,
    pub non_cla_kv_bytes_per_token: usize,
    pub num_blocks: usize,
    pub block_bytes: usize,
    pub capacity_tokens: usize,
}

pub struct Metrics {
    registry: Registry,
    pub kv_cache_usage_perc: Gauge,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    pub request_queue_time_seconds: Histogram,
    pub prompt_tokens_total: IntCounter,
    pub generation_tokens_total: IntCounter,
    pub num_preemptions_total: IntCounter,
    pub prefix_cache_queries_total: IntCounter,
    pub prefix_cache_hits_total: IntCounter,
    pub kv_cache_used_bytes: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_bytes_saved_by_sharing: IntGauge,
    pub engine_steps_total: IntCounter,
    pub engine_step_duration_seconds: Histogram,
    pub iteration_tokens: Histogram,
    step_phase_seconds: [Counter; StepPhase::ALL.len()],
    info: KvCacheInfo,
}

// vLLM's buckets.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
];
const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
];

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone())).expect("metric names are unique");
    m
}

impl Metrics {
    pub fn new(info: KvCacheInfo) -> Self {
        let r = Registry::new();
        let gauge = |n: &str, h: &str| reg(&r, Gauge::new(n, h).expect("valid metric"));
        let igauge = |n: &str, h: &str| reg(&r, IntGauge::new(n, h).expect("valid metric"));
        let counter = |n: &str, h: &str| reg(&r, IntCounter::new(n, h).expect("valid metric"));
        let hist = |n: &str, h: &str, b: &[f64]| {
            reg(
                &r,
                Histogram::with_opts(HistogramOpts::new(n, h).buckets(b.to_vec())).expect("valid metric"),
            )
        };
        let info_gauge = reg(
            &r,
            GaugeVec::new(
                Opts::new(
                    "crosskv_kv_cache_info",
                    "KV cache layout (value 1): layers, KV-producing layers, sharing",
                ),
                &[
                    "layers",
                    "kv_layers",
                    "cla_share_factor",
                    "block_size",
                    "dtype",
                    "kv_bytes_per_token",
                ],
            )
            .expect("valid metric"),
        );
        info_gauge
            .with_label_values(&[
                info.layers.to_string(),
                info.kv_layers.to_string(),
                info.cla_share_factor.map_or("none".to_string(), |f| f.to_string()),
                info.block_size.to_string(),
                info.dtype.clone(),
                info.kv_bytes_per_token.to_string(),
            ])
            .set(1.0);
        igauge(
            "crosskv_kv_cache_capacity_tokens",
            "Tokens the KV cache holds in every KV slot",
        )
        .set(info.capacity_tokens as i64);
        igauge("crosskv_kv_cache_bytes", "Bytes of KV cache storage").set((info.num_blocks * info.block_bytes) as i64);
        igauge("crosskv_kv_blocks", "KV cache blocks").set(info.num_blocks as i64);
        let phases = reg(
            &r,
            CounterVec::new(
                Opts::new(
                    "crosskv_engine_step_phase_seconds_total",
                    "Seconds engine steps spent in each phase (schedule, prepare, forward, update, publish)",
                ),
                &["phase"],
            )
            .expect("valid metric"),
        );
        Metrics {
            kv_cache_usage_perc: gauge(
                "crosskv_kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (0-1)",
            ),
            num_requests_running: igauge("crosskv_num_requests_running", "Requests in the running batch"),
            num_requests_waiting: igauge("crosskv_num_requests_waiting", "Requests waiting to be scheduled"),
            time_to_first_token_seconds: hist(
                "crosskv_time_to_first_token_seconds",
                "Time from arrival to the first generated token",
                TTFT_BUCKETS,
            ),
            inter_token_latency_seconds: hist(
                "crosskv_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request",
                ITL_BUCKETS,
            ),
            e2e_request_latency_seconds: hist(
                "crosskv_e2e_request_latency_seconds",
                "Time from arrival to the end of a request",
                REQUEST_BUCKETS,
            ),
            request_queue_time_seconds: hist(
                "crosskv_request_queue_time_seconds",
                "Time a request waited before it was first scheduled",
                REQUEST_BUCKETS,
            ),
            prompt_tokens_total: counter("crosskv_prompt_tokens_total", "Prompt tokens processed"),
            generation_tokens_total: counter("crosskv_generation_tokens_total", "Tokens generated"),
            num_preemptions_total: counter("crosskv_num_preemptions_total", "Requests preempted (recomputed later)"),
            prefix_cache_queries_total: counter(
                "crosskv_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache",
            ),
            prefix_cache_hits_total: counter(
                "crosskv_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache",
            ),
            kv_cache_used_bytes: igauge("crosskv_kv_cache_used_bytes", "Bytes of KV cache blocks in use"),
            kv_blocks_used: igauge("crosskv_kv_blocks_used", "KV cache blocks in use"),
            kv_bytes_saved_by_sharing: igauge(
                "crosskv_kv_bytes_saved_by_sharing",
                "Bytes the cached tokens would take with every layer a producer, minus what they take",
            ),
            engine_steps_total: counter("crosskv_engine_steps_total", "Engine steps run"),
            engine_step_duration_seconds: hist(
                "crosskv_engine_step_duration_seconds",
                "Wall time of an engine step, scheduling to published status",
                STEP_BUCKETS,
            ),
            iteration_tokens: hist(
                "crosskv_iteration_tokens",
                "Tokens (prompt and decode) in one engine step",
                ITERATION_TOKEN_BUCKETS,
            ),
            step_phase_seconds: StepPhase::ALL.map(|p| phases.with_label_values(&[p.label()])),
            registry: r,
            info,
        }
    }

    /// Updates the KV gauges from the pool's state: `used_blocks` in use, holding
    /// `cached_tokens` tokens per KV slot (summed over sequences).
    pub fn set_kv_usage(&self, used_blocks: usize, cached_tokens: usize) {
        let i = &self.info;
        self.kv_blocks_used.set(used_blocks as i64);
        self.kv_cache_used_bytes.set((used_blocks * i.block_bytes) as i64);
        self.kv_cache_usage_perc.set(if i.num_blocks == 0 {
            0.0
        } else {
            used_blocks as f64 / i.num_blocks as f64
        });
        let saved = cached_tokens * (i.non_cla_kv_bytes_per_token - i.kv_bytes_per_token);
        self.kv_bytes_saved_by_sharing.set(saved as i64);
    }

    /// Adds `seconds` to the time steps spent in `phase`.
    pub fn add_step_phase(&self, phase: StepPhase, seconds: f64) {
        self.step_phase_seconds[phase as usize].inc_by(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> KvCacheInfo {
        KvCacheInfo {
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
        }
    }

    #[test]
    fn every_declared_name_is_exported() {
        let m = Metrics::new(info());
        m.time_to_first_token_seconds.observe(0.1);
        m.add_step_phase(StepPhase::Forward, 0.25);
        m.add_step_phase(StepPhase::Forward, 0.5);
        m.set_kv_usage(5, 40);
        let text = m.render();
        for name in METRIC_NAMES {
            assert!(
                text.contains(&format!("\n{name}")) || text.starts_with(name),
                "{name} missing"
            );
        }
        assert!(text.contains("crosskv_kv_cache_usage_perc 0.5"));
        assert!(text.contains("crosskv_engine_step_phase_seconds_total{phase=\"forward\"} 0.75"));
        assert!(text.contains("crosskv_engine_step_phase_seconds_total{phase=\"update\"} 0"));
        assert!(text.contains("crosskv_kv_bytes_saved_by_sharing 20480"));
    }

    /// Prometheus naming: `_total` marks a counter, and only a counter.
    #[test]
    fn counters_and_only_counters_end_in_total() {
        let m = Metrics::new(info());
        m.add_step_phase(StepPhase::Forward, 0.25);
        let families = m.registry.gather();
        assert_eq!(families.len(), METRIC_NAMES.len());
        for f in families {
            let counter = f.get_field_type() == prometheus::proto::MetricType::COUNTER;
            assert_eq!(f.name().ends_with("_total"), counter, "{}", f.name());
        }
    }
}
