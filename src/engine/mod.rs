//! The engine (docs/architecture.md): one thread owns the model, the KV cache, the scheduler
//! and the KV manager, and runs steps synchronously: schedule → run → update. Front
//! ends talk to it only through a cloneable `EngineHandle`: commands in, and per
//! request an output channel. A request whose receiver is dropped (client gone) is
//! aborted at the next step and its blocks are freed.

pub mod output;
pub mod request;
pub mod scheduler;

pub use request::{EngineEvent, FinishReason, GenerateOptions, GenerateRequest, RequestId, TokenLogprob, Usage};
pub use scheduler::{AdmitError, Scheduled, Scheduler, SchedulerConfig};

use crate::kv::{CapacityReport, KvManager};
use crate::metrics::{KvCacheInfo, Metrics};
use crate::model::{Model, Tok};
use crate::runner::{Runner, Sampler, SeqStep};
use output::OutputText;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// How the engine is sized (the server's flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub kv_cache_bytes: u64,
    pub block_size: usize,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_queued_requests: usize,
    pub prefix_caching: bool,
    /// CUDA: decode steps as captured graphs (`Runner::set_cuda_graphs`).
    pub cuda_graphs: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "max_model_len {max_model_len} needs {need_bytes} bytes of KV cache ({need_blocks} blocks), but the budget of {have_bytes} bytes holds {have_blocks} blocks; raise --kv-cache-memory or lower --max-model-len"
    )]
    MaxModelLenDoesNotFit {
        max_model_len: usize,
        need_blocks: usize,
        have_blocks: usize,
        need_bytes: u64,
        have_bytes: u64,
    },
    #[error("the engine is shutting down")]
    ShutDown,
    #[error("too many requests queued ({0}); retry later")]
    QueueFull(usize),
    #[error("{0}")]
    Start(String),
}

/// The live state front ends can read without asking the engine thread.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineStatus {
    pub num_running: usize,
    pub num_waiting: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    /// Blocks in use per KV slot (distinct blocks: shared prefix blocks count once).
    pub blocks_used_per_slot: Vec<usize>,
}

enum Command {
    Add {
        id: RequestId,
        req: GenerateRequest,
        events: UnboundedSender<EngineEvent>,
        arrival: Instant,
    },
    Abort(RequestId),
    Fault(Fault),
    Shutdown,
}

/// Faults a test can make the engine thread meet in its next step, to check that the
/// server survives them (`EngineHandle::inject_fault`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The next step panics after scheduling, before its forward.
    PanicInStep,
    /// The next step sleeps this long after scheduling (a long prefill's stand-in).
    StallStep(std::time::Duration),
}

/// Requests in a step longer than this many prompt tokens, that need logits at every
/// position (prompt log-probs), are computed in chunks of it: each computed position
/// makes a full-vocabulary row of logits.
pub const MAX_SCORED_CHUNK: usize = 256;

struct HandleInner {
    tx: Mutex<mpsc::Sender<Command>>,
    next_id: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests sent to the engine thread that it has not taken in yet (it takes them
    /// between steps): counted as waiting so the status is current during a long step.
    pending_adds: Arc<AtomicUsize>,
    tokenizer: Arc<Tok>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<EngineStatus>>,
    capacity: CapacityReport,
    config: EngineConfig,
    vocab_size: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The front ends' side of the engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

/// One request's outputs. Dropping it aborts the request.
pub struct RequestStream {
    id: RequestId,
    rx: UnboundedReceiver<EngineEvent>,
    handle: Arc<HandleInner>,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }
    /// The next event; `None` once the engine has dropped the request.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.rx.recv().await
    }
    /// Blocking variant for non-async callers.
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        self.rx.blocking_recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.handle.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(tx) = self.handle.tx.lock() {
            let _ = tx.send(Command::Abort(self.id));
        }
    }
}

impl EngineHandle {
    /// Sizes the cache, checks `max_model_len` fits, logs the layout and starts the
    /// engine thread.
    pub fn start(model: Model, tokenizer: Tok, config: EngineConfig) -> Result<Self, EngineError> {
        Self::start_ranks(vec![model], tokenizer, config)
    }

    /// The engine over the ranks of a tensor-parallel model (rank 0 first; see
    /// `Runner::tensor_parallel`). `config.kv_cache_bytes` is each rank's budget: every
    /// rank holds the same blocks, of its own KV heads.
    pub fn start_ranks(mut ranks: Vec<Model>, tokenizer: Tok, config: EngineConfig) -> Result<Self, EngineError> {
        if ranks.is_empty() {
            return Err(EngineError::Start("no model".into()));
        }
        let model = ranks.remove(0);
        // Refused here rather than as a failed step for every request.
        let head_dim = model.config().head_dim;
        if model.device().is_cuda() && !crate::ops::paged_attention::CUDA_HEAD_DIMS.contains(&head_dim) {
            return Err(EngineError::Start(format!(
                "head_dim {head_dim} is not supported on CUDA (paged attention is built for {:?}); serve this model on the CPU",
                crate::ops::paged_attention::CUDA_HEAD_DIMS
            )));
        }
        let layout = model.layout().clone();
        let cap = layout.capacity(config.kv_cache_bytes, config.block_size, config.max_model_len);
        let need_blocks = config.max_model_len.div_ceil(config.block_size) * layout.kv_layers();
        if cap.num_blocks < need_blocks {
            return Err(EngineError::MaxModelLenDoesNotFit {
                max_model_len: config.max_model_len,
                need_blocks,
                have_blocks: cap.num_blocks,
                need_bytes: (need_blocks * cap.block_bytes) as u64,
                have_bytes: config.kv_cache_bytes,
            });
        }
        tracing::info!(
            "KV cache: {} blocks of {} tokens, {} tokens ({} bytes); {} bytes/token with sharing ({} of {} layers produce K/V), {} without; max concurrency at max_model_len {}: {} (without sharing: {})",
            cap.num_blocks,
            cap.block_size,
            cap.capacity_tokens,
            cap.num_blocks * cap.block_bytes,
            cap.kv_bytes_per_token,
            cap.kv_layers,
            cap.layers,
            cap.non_cla_kv_bytes_per_token,
            config.max_model_len,
            cap.max_concurrency,
            cap.non_cla_max_concurrency,
        );
        let metrics = Arc::new(Metrics::new(KvCacheInfo {
            layers: cap.layers,
            kv_layers: cap.kv_layers,
            cla_share_factor: cap.cla_share_factor,
            block_size: cap.block_size,
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            kv_bytes_per_token: cap.kv_bytes_per_token,
            non_cla_kv_bytes_per_token: cap.non_cla_kv_bytes_per_token,
            num_blocks: cap.num_blocks,
            block_bytes: cap.block_bytes,
            capacity_tokens: cap.capacity_tokens,
        }));
        let vocab_size = model.config().vocab_size;
        let world = 1 + ranks.len();
        if world > 1 {
            tracing::info!("tensor parallelism: {world} ranks; the KV figures above are per rank");
        }
        let mut runner = Runner::tensor_parallel(
            std::iter::once(model).chain(ranks).collect(),
            cap.num_blocks,
            config.block_size,
        )
        .map_err(|e| EngineError::Start(e.to_string()))?;
        if runner.set_cuda_graphs(config.cuda_graphs) {
            tracing::info!(
                "decode steps of up to {} sequences run as CUDA graphs (--enforce-eager: off)",
                crate::runner::MAX_GRAPH_BATCH
            );
        }
        let kv = KvManager::new(layout, cap.num_blocks, config.block_size);
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
                prefix_caching: config.prefix_caching,
            },
            kv,
        );
        let tokenizer = Arc::new(tokenizer);
        let status = Arc::new(Mutex::new(EngineStatus {
            blocks_free: cap.num_blocks,
            blocks_used_per_slot: vec![0; cap.kv_layers],
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel();
        let pending_adds = Arc::new(AtomicUsize::new(0));
        let engine = Engine {
            runner,
            scheduler,
            requests: HashMap::new(),
            tokenizer: tokenizer.clone(),
            metrics: metrics.clone(),
            status: status.clone(),
            max_model_len: config.max_model_len,
            pending_adds: pending_adds.clone(),
            in_step: Vec::new(),
            fault: None,
        };
        let thread = std::thread::Builder::new()
            .name("crosskv-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(|e| EngineError::Start(e.to_string()))?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                tx: Mutex::new(tx),
                next_id: AtomicU64::new(1),
                in_flight: AtomicUsize::new(0),
                pending_adds,
                tokenizer,
                metrics,
                status,
                capacity: cap,
                config,
                vocab_size,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        let inner = &self.inner;
        let queued = inner.in_flight.fetch_add(1, Ordering::Relaxed);
        if queued >= inner.config.max_queued_requests {
            inner.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::QueueFull(queued));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = unbounded_channel();
        let stream = RequestStream {
            id,
            rx,
            handle: inner.clone(),
        };
        inner.pending_adds.fetch_add(1, Ordering::Relaxed);
        let sent = inner.tx.lock().map_err(|_| EngineError::ShutDown).and_then(|tx| {
            tx.send(Command::Add {
                id,
                req,
                events,
                arrival: Instant::now(),
            })
            .map_err(|_| EngineError::ShutDown)
        });
        if let Err(e) = sent {
            inner.pending_adds.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        Ok(stream)
    }

    pub fn tokenizer(&self) -> &Arc<Tok> {
        &self.inner.tokenizer
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }
    pub fn capacity(&self) -> &CapacityReport {
        &self.inner.capacity
    }
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }
    /// The status the engine published last (after its latest scheduling), with the
    /// requests sent since then counted as waiting.
    pub fn status(&self) -> EngineStatus {
        let mut s = self.inner.status.lock().map(|s| s.clone()).unwrap_or_default();
        s.num_waiting += self.inner.pending_adds.load(Ordering::Relaxed);
        s
    }

    /// The engine thread is running (it has not stopped or died).
    pub fn is_alive(&self) -> bool {
        self.inner
            .thread
            .lock()
            .is_ok_and(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// Makes the engine meet `fault` in its next step: for tests of how the server
    /// copes (a panic is caught and fails that step's requests; a stall stands in for a
    /// long step). Not part of the serving API.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        if let Ok(tx) = self.inner.tx.lock() {
            let _ = tx.send(Command::Fault(fault));
        }
    }

    /// Stops the engine: running requests are aborted, then the thread exits.
    pub fn shutdown(&self) {
        if let Ok(tx) = self.inner.tx.lock() {
            let _ = tx.send(Command::Shutdown);
        }
        if let Some(t) = self.inner.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

/// One request's engine-side state.
struct Live {
    events: UnboundedSender<EngineEvent>,
    options: GenerateOptions,
    sampler: Sampler,
    text: OutputText,
    prompt_len: usize,
    generated: Vec<u32>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    last_token: Option<Instant>,
    cached_tokens: usize,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

impl Live {
    /// The next token is the argmax and nothing else is read from the row: greedy, no
    /// log-probs, no min_tokens masking left to do.
    fn greedy_pick_suffices(&self) -> bool {
        self.sampler.is_greedy() && self.options.logprobs.is_none() && self.generated.len() >= self.options.min_tokens
    }
}

struct Engine {
    runner: Runner,
    scheduler: Scheduler,
    requests: HashMap<RequestId, Live>,
    tokenizer: Arc<Tok>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<EngineStatus>>,
    max_model_len: usize,
    pending_adds: Arc<AtomicUsize>,
    /// The requests of the step under way: they fail if it panics.
    in_step: Vec<RequestId>,
    fault: Option<Fault>,
}

/// The text of a caught panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Log-softmax of `logits` at `token`, with the `top` best alternatives.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let pos = best.partition_point(|&(_, y)| y >= x);
                best.insert(pos, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| x - lse),
        top: best.into_iter().map(|(i, x)| (i, x - lse)).collect(),
    }
}

impl Engine {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn(&rx)));
            match turn {
                Ok(true) => continue,
                Ok(false) => return,
                Err(p) => self.recover(&*p),
            }
        }
    }

    /// A panic on the engine thread fails the requests of the step it hit (they may be
    /// half-updated) and frees their blocks; the engine goes on with the others.
    fn recover(&mut self, panic: &(dyn std::any::Any + Send)) {
        let msg = panic_message(panic);
        tracing::error!(
            "engine step panicked: {msg}; failing its {} request(s)",
            self.in_step.len()
        );
        for id in std::mem::take(&mut self.in_step) {
            if let Some(l) = self.requests.get(&id) {
                let _ = l.events.send(EngineEvent::Error(format!("internal error: {msg}")));
            }
            self.finish(id, FinishReason::Abort);
        }
        // A panic outside a step may have left a request known to one side only.
        let scheduled: std::collections::HashSet<RequestId> = self.scheduler.ids().into_iter().collect();
        for id in &scheduled {
            if !self.requests.contains_key(id) {
                if let Err(e) = self.scheduler.remove(*id) {
                    tracing::error!("freeing request {id}: {e}");
                }
            }
        }
        let orphans: Vec<RequestId> = self
            .requests
            .keys()
            .filter(|id| !scheduled.contains(id))
            .copied()
            .collect();
        for id in orphans {
            if let Some(l) = self.requests.get(&id) {
                let _ = l.events.send(EngineEvent::Error(format!("internal error: {msg}")));
            }
            self.finish(id, FinishReason::Abort);
        }
        self.publish();
    }

    /// One turn of the loop: take commands, drop requests whose clients left, run a
    /// step. False once the engine is to stop.
    fn turn(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        // Idle: block for work. Busy: take what arrived and go on stepping.
        let first = if self.scheduler.has_work() {
            rx.try_recv().ok()
        } else {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return false,
            }
        };
        let mut stop = false;
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Command::Add {
                    id,
                    req,
                    events,
                    arrival,
                } => {
                    self.pending_adds.fetch_sub(1, Ordering::Relaxed);
                    self.add(id, req, events, arrival)
                }
                Command::Abort(id) => self.finish(id, FinishReason::Abort),
                Command::Fault(f) => self.fault = Some(f),
                Command::Shutdown => stop = true,
            }
        }
        if stop {
            let ids: Vec<RequestId> = self.requests.keys().copied().collect();
            for id in ids {
                self.finish(id, FinishReason::Abort);
            }
            self.publish();
            return false;
        }
        // Clients that went away since the last step.
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Abort);
        }
        if self.scheduler.has_work() {
            self.step();
            self.in_step.clear();
        }
        self.publish();
        true
    }

    fn add(&mut self, id: RequestId, req: GenerateRequest, events: UnboundedSender<EngineEvent>, arrival: Instant) {
        let o = req.options;
        let prompt_len = req.prompt_ids.len();
        let max_total = prompt_len
            .saturating_add(o.max_tokens)
            .min(self.max_model_len.max(prompt_len));
        if prompt_len == 0 {
            let _ = events.send(EngineEvent::Error("the prompt is empty".into()));
            return;
        }
        // Prompt log-probs need logits at every prompt position: no prefix-cache skip.
        if let Err(e) = self
            .scheduler
            .add(id, req.prompt_ids, max_total, o.prompt_logprobs.is_none())
        {
            let _ = events.send(EngineEvent::Error(e.to_string()));
            return;
        }
        if o.prompt_logprobs.is_some() {
            self.scheduler.set_max_chunk(id, MAX_SCORED_CHUNK);
        }
        self.metrics.prompt_tokens_total.inc_by(prompt_len as u64);
        self.requests.insert(
            id,
            Live {
                events,
                sampler: Sampler::new(o.sampling.clone()),
                text: OutputText::new(o.stop.clone()),
                prompt_logprobs: o.prompt_logprobs.map(|_| vec![None]),
                options: o,
                prompt_len,
                generated: Vec::new(),
                arrival,
                first_scheduled: None,
                last_token: None,
                cached_tokens: 0,
            },
        );
    }

    fn step(&mut self) {
        let out = self.scheduler.schedule();
        self.metrics.num_preemptions_total.inc_by(out.preempted.len() as u64);
        self.metrics
            .prefix_cache_queries_total
            .inc_by(out.prefix_queries as u64);
        self.metrics.prefix_cache_hits_total.inc_by(out.prefix_hits as u64);
        if out.scheduled.is_empty() {
            // Nothing fits this step (e.g. --max-num-seqs reached by requests being
            // aborted); wait briefly rather than spin.
            std::thread::sleep(std::time::Duration::from_millis(1));
            return;
        }
        self.in_step = out.scheduled.iter().map(|s| s.id).collect();
        // What this step holds is known now: publish before the forward, which may be long.
        self.publish();
        match self.fault.take() {
            Some(Fault::PanicInStep) => panic!("injected fault: a panic in the step"),
            Some(Fault::StallStep(d)) => std::thread::sleep(d),
            None => {}
        }
        let now = Instant::now();
        let steps: Vec<SeqStep> = out
            .scheduled
            .iter()
            .map(|s| {
                let live = self.requests.get_mut(&s.id);
                let all_logits = live.as_ref().is_some_and(|l| {
                    l.prompt_logprobs.as_ref().is_some_and(|p| p.len() < l.prompt_len) && s.start < l.prompt_len
                });
                if let Some(l) = live {
                    if l.first_scheduled.is_none() {
                        l.first_scheduled = Some(now);
                        l.cached_tokens = s.cached_tokens;
                        self.metrics
                            .request_queue_time_seconds
                            .observe((now - l.arrival).as_secs_f64());
                    }
                }
                SeqStep {
                    seq: s.id,
                    tokens: s.tokens.clone(),
                    start_pos: s.start,
                    all_logits,
                }
            })
            .collect();
        // Which output rows must come to the host whole: prompt log-probs, and sampling
        // rows that are not plain greedy picks (temperature, log-probs, min_tokens masking).
        // Prompt rows are scored where they are (`collect_prompt_logprobs`), never copied.
        let mut full = Vec::new();
        for (s, step) in out.scheduled.iter().zip(&steps) {
            if step.all_logits {
                full.extend(std::iter::repeat_n(false, step.tokens.len() - 1));
            }
            full.push(s.samples && self.requests.get(&s.id).is_some_and(|l| !l.greedy_pick_suffices()));
        }
        let logits = self.runner.step(self.scheduler.kv(), &steps).and_then(|t| {
            let fetched = crate::runner::fetch_logits(&t, &full)?;
            Ok((t, fetched))
        });
        let (tensor, logits) = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("step failed: {e}");
                for s in &out.scheduled {
                    if let Some(l) = self.requests.get(&s.id) {
                        let _ = l.events.send(EngineEvent::Error(format!("inference failed: {e}")));
                    }
                    self.finish(s.id, FinishReason::Abort);
                }
                return;
            }
        };
        let mut row = 0;
        for (s, step) in out.scheduled.iter().zip(&steps) {
            let rows = if step.all_logits { step.tokens.len() } else { 1 };
            let range = row..row + rows;
            row += rows;
            self.scheduler.computed(s);
            if step.all_logits {
                if let Err(e) = self.collect_prompt_logprobs(s, &tensor, range.start) {
                    if let Some(l) = self.requests.get(&s.id) {
                        let _ = l
                            .events
                            .send(EngineEvent::Error(format!("scoring the prompt failed: {e}")));
                    }
                    self.finish(s.id, FinishReason::Abort);
                    continue;
                }
            }
            if s.samples {
                let last = range.end - 1;
                self.sample(s.id, logits.rows[last].as_deref(), logits.argmax[last]);
            }
        }
    }

    /// Prompt log-probs: the logits at position p score the prompt token at p + 1. The
    /// step's logits rows `first_row..` are this chunk's positions; they are read a few
    /// rows at a time, so scoring costs no more memory than those rows.
    fn collect_prompt_logprobs(
        &mut self,
        s: &Scheduled,
        logits: &candle_core::Tensor,
        first_row: usize,
    ) -> candle_core::Result<()> {
        const ROWS_AT_ONCE: usize = 32;
        let Some(l) = self.requests.get_mut(&s.id) else {
            return Ok(());
        };
        let Some(tokens) = self.scheduler.tokens(s.id) else {
            return Ok(());
        };
        let top = l.options.prompt_logprobs.unwrap_or(0);
        let Some(acc) = l.prompt_logprobs.as_mut() else {
            return Ok(());
        };
        // Positions whose next token is a prompt token not scored yet (a recomputed
        // chunk after a preemption is skipped): next = start + i + 1 in
        // acc.len()..prompt_len.
        let lo = acc.len().saturating_sub(s.start + 1);
        let hi = s.tokens.len().min(l.prompt_len.saturating_sub(s.start + 1));
        for chunk in (lo..hi).step_by(ROWS_AT_ONCE) {
            let n = ROWS_AT_ONCE.min(hi - chunk);
            let rows = logits.narrow(0, first_row + chunk, n)?.to_vec2::<f32>()?;
            for (k, r) in rows.iter().enumerate() {
                let next = s.start + chunk + k + 1;
                if acc.len() == next {
                    acc.push(Some(token_logprob(r, tokens[next], top)));
                }
            }
        }
        if acc.len() == l.prompt_len {
            let done = std::mem::take(acc);
            let _ = l.events.send(EngineEvent::PromptLogprobs(done.clone()));
            // Keep a full-length marker so they are not sent again after a preemption.
            *acc = done;
        }
        Ok(())
    }

    /// `logits`: the row, when the request needs more than a greedy pick
    /// ([`Live::greedy_pick_suffices`]); else `greedy` (the device's argmax) is the token.
    fn sample(&mut self, id: RequestId, logits: Option<&[f32]>, greedy: u32) {
        let Some(l) = self.requests.get_mut(&id) else { return };
        let o = &l.options;
        let (token, logprob) = match logits {
            None => (greedy, None),
            Some(logits) => {
                let mut masked;
                let mut scores = logits;
                // Before min_tokens, EOS and stop tokens cannot be picked.
                if l.generated.len() < o.min_tokens {
                    masked = logits.to_vec();
                    let eos = if o.ignore_eos {
                        None
                    } else {
                        Some(&self.tokenizer.eos_ids)
                    };
                    for &t in o.stop_token_ids.iter().chain(eos.into_iter().flatten()) {
                        if let Some(x) = masked.get_mut(t as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    scores = &masked;
                }
                let token = l.sampler.sample(scores);
                (token, o.logprobs.map(|top| token_logprob(logits, token, top)))
            }
        };
        let now = Instant::now();
        match l.last_token {
            None => self
                .metrics
                .time_to_first_token_seconds
                .observe((now - l.arrival).as_secs_f64()),
            Some(t) => self
                .metrics
                .inter_token_latency_seconds
                .observe((now - t).as_secs_f64()),
        }
        l.last_token = Some(now);
        l.generated.push(token);
        self.metrics.generation_tokens_total.inc();
        let is_eos = !o.ignore_eos && self.tokenizer.eos_ids.contains(&token);
        let is_stop_token = o.stop_token_ids.contains(&token);
        let (text, stop_string) = if is_eos || is_stop_token {
            (String::new(), false)
        } else {
            match l.text.push(&self.tokenizer, token) {
                Ok(t) => t,
                Err(e) => {
                    let _ = l.events.send(EngineEvent::Error(e.to_string()));
                    self.finish(id, FinishReason::Abort);
                    return;
                }
            }
        };
        let total = l.prompt_len + l.generated.len();
        let reason = if is_eos || is_stop_token || stop_string {
            Some(FinishReason::Stop)
        } else if l.generated.len() >= o.max_tokens || total >= self.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        // Text held back as a possible stop-string start goes out when the request
        // ends any other way.
        let text = if reason.is_some() && !stop_string {
            text + &l.text.flush()
        } else {
            text
        };
        let _ = l.events.send(EngineEvent::Token {
            id: token,
            text,
            logprob,
        });
        match reason {
            Some(r) => self.finish(id, r),
            None => self.scheduler.append_token(id, token),
        }
    }

    /// Ends a request: frees its blocks and sends `Finished`.
    fn finish(&mut self, id: RequestId, reason: FinishReason) {
        if let Err(e) = self.scheduler.remove(id) {
            tracing::error!("freeing request {id}: {e}");
        }
        let Some(l) = self.requests.remove(&id) else { return };
        self.metrics
            .e2e_request_latency_seconds
            .observe(l.arrival.elapsed().as_secs_f64());
        let usage = Usage {
            prompt_tokens: l.prompt_len,
            completion_tokens: l.generated.len(),
            cached_tokens: l.cached_tokens,
        };
        let _ = l.events.send(EngineEvent::Finished { reason, usage });
    }

    fn publish(&self) {
        let kv = self.scheduler.kv();
        let status = EngineStatus {
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            blocks_used: kv.num_used_blocks(),
            blocks_free: kv.num_free_blocks(),
            blocks_used_per_slot: kv.used_blocks_per_slot(),
        };
        self.metrics.num_requests_running.set(status.num_running as i64);
        self.metrics.num_requests_waiting.set(status.num_waiting as i64);
        self.metrics
            .set_kv_usage(status.blocks_used, self.scheduler.cached_tokens());
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }
}
