//! The front ends' side of the engine: [`EngineHandle`] starts the engine thread,
//! queues requests (counted against `--max-queued-requests`) and reads the status the
//! thread publishes; a request's events come back on its [`RequestStream`].

use super::core::{self, Command};
use super::output::OutputText;
use super::request::EngineOutput;
use super::structured::StructuredOutputs;
use super::{
    EngineConfig, EngineError, EngineEvent, EngineStatus, Fault, FinishReason, GenerateRequest, RequestId, Usage,
};
use super::{Scheduler, SchedulerConfig};
use crate::kv::{CapacityReport, KvManager};
use crate::metrics::{KvCacheInfo, Metrics};
use crate::model::{Model, Tok};
use crate::runner::Runner;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

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
    structured: StructuredOutputs,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The front ends' side of the engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

/// One request's outputs. Dropping it aborts the request.
///
/// The engine sends token ids; the stream turns them into text and matches the stop
/// strings as the caller reads them, on the caller's thread (the engine thread only
/// samples). A stop string ends the stream at once and tells the engine to drop the
/// request, which may have run a step further by then; that token is never seen.
pub struct RequestStream {
    id: RequestId,
    rx: UnboundedReceiver<EngineOutput>,
    handle: Arc<HandleInner>,
    text: OutputText,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// The `Finished` a stop string made, returned by the next read.
    stopped: Option<EngineEvent>,
    /// Nothing more is read: the stream ended by a stop string or a decoding error.
    ended: bool,
}

impl RequestStream {
    pub fn id(&self) -> RequestId {
        self.id
    }
    /// The next event; `None` once the request has ended.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        if let Some(e) = self.stopped.take() {
            return Some(e);
        }
        if self.ended {
            return None;
        }
        let out = self.rx.recv().await?;
        Some(self.event(out))
    }
    /// Blocking variant for non-async callers.
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        if let Some(e) = self.stopped.take() {
            return Some(e);
        }
        if self.ended {
            return None;
        }
        let out = self.rx.blocking_recv()?;
        Some(self.event(out))
    }

    /// The event the caller sees for what the engine sent: token ids decoded, stop
    /// strings matched.
    fn event(&mut self, out: EngineOutput) -> EngineEvent {
        match out {
            EngineOutput::PromptLogprobs(p) => EngineEvent::PromptLogprobs(p),
            EngineOutput::Finished { reason, usage } => EngineEvent::Finished { reason, usage },
            EngineOutput::Error(e) => EngineEvent::Error(e),
            EngineOutput::Token {
                id,
                logprob,
                decode,
                last,
                cached_tokens,
            } => {
                self.completion_tokens += 1;
                self.cached_tokens = cached_tokens;
                let (mut text, stop) = if decode {
                    match self.text.push(&self.handle.tokenizer, id) {
                        Ok(t) => t,
                        Err(e) => {
                            self.end();
                            return EngineEvent::Error(e.to_string());
                        }
                    }
                } else {
                    (String::new(), false)
                };
                if stop {
                    self.stopped = Some(EngineEvent::Finished {
                        reason: FinishReason::Stop,
                        usage: Usage {
                            prompt_tokens: self.prompt_tokens,
                            completion_tokens: self.completion_tokens,
                            cached_tokens: self.cached_tokens,
                        },
                    });
                    self.end();
                } else if last {
                    text += &self.text.flush();
                }
                EngineEvent::Token { id, text, logprob }
            }
        }
    }

    /// Ends the stream here and has the engine drop the request.
    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            self.rx.close();
            if let Ok(tx) = self.handle.tx.lock() {
                let _ = tx.send(Command::Abort(self.id));
            }
        }
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.handle.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.end();
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
        let cap = config.validate(&model)?;
        let layout = model.layout().clone();
        tracing::info!(
            "KV cache: {} elements, {} blocks of {} tokens, {} tokens ({} bytes); {} bytes/token with sharing ({} of {} layers produce K/V), {} without; max concurrency at max_model_len {}: {} (without sharing: {})",
            cap.kv_cache_dtype,
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
            dtype: cap.kv_cache_dtype.clone(),
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
        let thread = core::Engine::new(
            runner,
            scheduler,
            tokenizer.clone(),
            metrics.clone(),
            status.clone(),
            config.max_model_len,
            pending_adds.clone(),
            config.async_scheduling,
        )
        .spawn(rx)
        .map_err(|e| EngineError::Start(e.to_string()))?;
        let structured = StructuredOutputs::new(tokenizer.clone(), vocab_size);
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
                structured,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Queues a request; its events arrive on the returned stream.
    /// A request with a constraint has it compiled here, on the caller's thread.
    pub fn submit(&self, req: GenerateRequest) -> Result<RequestStream, EngineError> {
        let inner = &self.inner;
        let constraint = match &req.options.constraint {
            Some(c) => Some(Box::new(inner.structured.matcher(c).map_err(EngineError::Constraint)?)),
            None => None,
        };
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
            text: OutputText::new(req.options.stop.clone()),
            prompt_tokens: req.prompt_ids.len(),
            completion_tokens: 0,
            cached_tokens: 0,
            stopped: None,
            ended: false,
        };
        inner.pending_adds.fetch_add(1, Ordering::Relaxed);
        let sent = inner.tx.lock().map_err(|_| EngineError::ShutDown).and_then(|tx| {
            tx.send(Command::Add {
                id,
                req: Box::new(req),
                constraint,
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
    /// The model's structured-output compiler (front ends check constraints with it).
    pub fn structured(&self) -> &StructuredOutputs {
        &self.inner.structured
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
