//! The engine thread: one loop that takes commands (add, abort, shutdown), drops the
//! requests whose clients left, and runs one step at a time, synchronously, in three
//! phases: schedule (the scheduler and the KV manager pick the step's work), execute
//! (the runner's batched forward) and update (sampling, EOS and length checks, events
//! queued, finished requests freed). Text and stop strings are not its work: each
//! request's stream does them (`handle.rs`). A panic inside a step fails that step's
//! requests only.

mod overlap;

use super::outbox::Outbox;
use super::request::EngineOutput;
use super::scheduler::SchedulerOutput;
use super::structured::{ConstraintMatcher, TokenMask};
use super::{EngineStatus, Fault, FinishReason, GenerateOptions, GenerateRequest, RequestId};
use super::{Scheduled, Scheduler, TokenLogprob, Usage, MAX_SCORED_CHUNK};
use crate::metrics::{Metrics, StepPhase};
use crate::model::Tok;
use crate::runner::sampler::{mask_tokens, token_logprob};
use crate::runner::{Runner, Sampler, SeqStep, StepLogits};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// What the handle sends the engine thread.
pub(super) enum Command {
    Add {
        id: RequestId,
        /// Boxed: the options (stop strings, logit bias) make it the largest variant by far.
        req: Box<GenerateRequest>,
        /// The request's constraint, compiled on the caller's side (compiling a large
        /// schema here would stall every request's step).
        constraint: Option<Box<ConstraintMatcher>>,
        events: UnboundedSender<EngineOutput>,
        arrival: Instant,
    },
    Abort(RequestId),
    Fault(Fault),
    Shutdown,
}

/// One request's engine-side state.
struct Live {
    events: UnboundedSender<EngineOutput>,
    options: GenerateOptions,
    sampler: Sampler,
    prompt_len: usize,
    generated: Vec<u32>,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    last_token: Option<Instant>,
    cached_tokens: usize,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// Where the output stands in its grammar (structured outputs).
    constraint: Option<ConstraintMatcher>,
}

impl Live {
    /// The next token is the raw row's argmax and nothing else is read from the row:
    /// greedy, no log-probs, no min_tokens masking left to do, no logit bias or
    /// penalty (either can move the argmax), and no grammar to mask the row with.
    fn greedy_pick_suffices(&self) -> bool {
        self.greedy_pick_suffices_after(self.generated.len())
    }

    /// [`Live::greedy_pick_suffices`] once `generated` tokens are out.
    fn greedy_pick_suffices_after(&self, generated: usize) -> bool {
        self.sampler.is_greedy()
            && !self.sampler.adjusts_logits()
            && self.options.logprobs.is_none()
            && generated >= self.options.min_tokens
            && self.constraint.is_none()
    }

    /// The device may pick this request's tokens: nothing of its row is needed on the
    /// host (no log-probs) and no grammar masks it (a constrained row comes to the host
    /// whole, where its mask is applied).
    fn device_may_sample(&self) -> bool {
        self.options.logprobs.is_none() && self.constraint.is_none()
    }

    /// Once `generated` tokens are out, the device can pick the next token without the
    /// host reading the one before: nothing of the row comes to the host, and nothing
    /// of the pick depends on the tokens so far (no penalty, no min_tokens mask, no
    /// grammar).
    fn device_pick_suffices_after(&self, generated: usize) -> bool {
        self.device_may_sample() && !self.sampler.has_penalties() && generated >= self.options.min_tokens
    }
}

pub(super) struct Engine {
    runner: Runner,
    scheduler: Scheduler,
    requests: FxHashMap<RequestId, Live>,
    tokenizer: Arc<Tok>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<EngineStatus>>,
    max_model_len: usize,
    pending_adds: Arc<AtomicUsize>,
    /// The requests of the step under way: they fail if it panics.
    in_step: Vec<RequestId>,
    fault: Option<Fault>,
    /// Every event goes out through here, a step's worth at a time.
    outbox: Outbox,
    /// Decode steps launched without waiting, the next one queued behind (`overlap.rs`).
    async_scheduling: bool,
    /// The step launched and not yet updated.
    in_flight: Option<overlap::InFlight>,
    /// Live requests with a structured-output constraint: with none, a step looks for
    /// no masks to compute.
    num_constrained: usize,
    /// Sampled rows are picked where the logits are (CUDA), not copied to the host.
    device_sampling: bool,
}

/// The text of a caught panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// How a step's sampling rows reach their tokens, besides the device's argmax of each.
pub(super) struct RowPlan {
    /// Per logits row: copied to the host whole (log-probs, host sampling).
    full: Vec<bool>,
    /// Logits rows sampled where the logits are, and whose.
    on_device: Vec<(u32, RequestId)>,
}

/// What [`Engine::execute`] hands [`Engine::update`]: the step's sequences, the
/// logits tensor (rows read in place for prompt log-probs), the rows fetched to the
/// host, and the constrained requests' masks for this step's pick.
struct Executed {
    steps: Vec<SeqStep>,
    tensor: candle_core::Tensor,
    logits: StepLogits,
    masks: FxHashMap<RequestId, Result<TokenMask, String>>,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        runner: Runner,
        scheduler: Scheduler,
        tokenizer: Arc<Tok>,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<EngineStatus>>,
        max_model_len: usize,
        pending_adds: Arc<AtomicUsize>,
        async_scheduling: bool,
    ) -> Self {
        Engine {
            scheduler,
            requests: FxHashMap::default(),
            tokenizer,
            metrics,
            status,
            max_model_len,
            pending_adds,
            in_step: Vec::new(),
            fault: None,
            outbox: Outbox::start(),
            async_scheduling,
            in_flight: None,
            num_constrained: 0,
            device_sampling: runner.model().device().is_cuda(),
            runner,
        }
    }

    /// Starts the engine thread (`crosskv-engine`), serving the commands of `rx`.
    pub(super) fn spawn(self, rx: mpsc::Receiver<Command>) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("crosskv-engine".into())
            .spawn(move || self.run(rx))
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            let turn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn(&rx)));
            let go_on = match turn {
                Ok(go_on) => go_on,
                Err(p) => {
                    self.recover(&*p);
                    true
                }
            };
            // The turn's events go out together, after its step.
            self.outbox.flush();
            if !go_on {
                return;
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
                self.outbox
                    .send(&l.events, EngineOutput::Error(format!("internal error: {msg}")));
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
                self.outbox
                    .send(&l.events, EngineOutput::Error(format!("internal error: {msg}")));
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
                    constraint,
                    events,
                    arrival,
                } => {
                    self.pending_adds.fetch_sub(1, Ordering::Relaxed);
                    self.add(id, *req, constraint.map(|c| *c), events, arrival)
                }
                Command::Abort(id) => self.finish(id, FinishReason::Abort),
                Command::Fault(f) => self.fault = Some(f),
                Command::Shutdown => stop = true,
            }
        }
        if stop {
            if let Some(f) = self.in_flight.take() {
                self.complete(f);
                if let Some(next) = self.in_flight.take() {
                    self.complete(next);
                }
            }
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
        let start = Instant::now();
        let tokens = if let Some(f) = self.in_flight.take() {
            Some(self.complete(f))
        } else if self.scheduler.has_work() {
            self.step()
        } else {
            self.publish();
            return true;
        };
        self.in_step.clear();
        let published = Instant::now();
        self.publish();
        if let Some(n) = tokens {
            let m = &self.metrics;
            m.add_step_phase(StepPhase::Publish, published.elapsed().as_secs_f64());
            m.engine_steps_total.inc();
            m.engine_step_duration_seconds.observe(start.elapsed().as_secs_f64());
            m.iteration_tokens.observe(n as f64);
        }
        true
    }

    fn add(
        &mut self,
        id: RequestId,
        req: GenerateRequest,
        constraint: Option<ConstraintMatcher>,
        events: UnboundedSender<EngineOutput>,
        arrival: Instant,
    ) {
        let o = req.options;
        let prompt_len = req.prompt_ids.len();
        let max_total = prompt_len
            .saturating_add(o.max_tokens)
            .min(self.max_model_len.max(prompt_len));
        if prompt_len == 0 {
            self.outbox
                .send(&events, EngineOutput::Error("the prompt is empty".into()));
            return;
        }
        // The repetition penalty counts the prompt's tokens: read before the scheduler takes them.
        let sampler = Sampler::with_prompt(o.sampling.clone(), &req.prompt_ids);
        // Prompt log-probs need logits at every prompt position: no prefix-cache skip.
        if let Err(e) = self
            .scheduler
            .add(id, req.prompt_ids, max_total, o.prompt_logprobs.is_none())
        {
            self.outbox.send(&events, EngineOutput::Error(e.to_string()));
            return;
        }
        if o.prompt_logprobs.is_some() {
            self.scheduler.set_max_chunk(id, MAX_SCORED_CHUNK);
        }
        self.metrics.prompt_tokens_total.inc_by(prompt_len as u64);
        self.num_constrained += usize::from(constraint.is_some());
        self.requests.insert(
            id,
            Live {
                events,
                sampler,
                prompt_logprobs: o.prompt_logprobs.map(|_| vec![None]),
                options: o,
                prompt_len,
                generated: Vec::new(),
                arrival,
                first_scheduled: None,
                last_token: None,
                cached_tokens: 0,
                constraint,
            },
        );
    }

    /// One step, in vLLM's EngineCore order: schedule → execute → update, each phase
    /// timed. The tokens the step ran, or `None` when no forward ran.
    fn step(&mut self) -> Option<usize> {
        let t = Instant::now();
        let out = self.schedule();
        self.metrics
            .add_step_phase(StepPhase::Schedule, t.elapsed().as_secs_f64());
        let out = out?;
        let tokens = out.scheduled.iter().map(|s| s.tokens.len()).sum();
        let (steps, plan) = self.prepare(&out);
        let (out, steps) = match self.launch(out, steps, &plan) {
            Ok(()) => return Some(tokens),
            Err(not_launched) => not_launched,
        };
        let ex = self.execute(&out, steps, plan)?;
        let t = Instant::now();
        self.update(&out, ex);
        self.metrics
            .add_step_phase(StepPhase::Update, t.elapsed().as_secs_f64());
        Some(tokens)
    }

    /// Schedule: the scheduler picks this step's work under the token budget (preempting
    /// when blocks run out); what the step holds is published before the forward.
    /// `None`: nothing fits this step.
    fn schedule(&mut self) -> Option<SchedulerOutput> {
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
            return None;
        }
        self.in_step = out.scheduled.iter().map(|s| s.id).collect();
        // What this step holds is known now: publish before the forward, which may be long.
        self.publish();
        match self.fault.take() {
            Some(Fault::PanicInStep) => panic!("injected fault: a panic in the step"),
            Some(Fault::StallStep(d)) => std::thread::sleep(d),
            None => {}
        }
        Some(out)
    }

    /// Prepare: the step's sequences for the runner (first scheduling recorded), and
    /// how each sampling row is picked.
    fn prepare(&mut self, out: &SchedulerOutput) -> (Vec<SeqStep>, RowPlan) {
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
        // Sampling rows that are not plain greedy picks (temperature, bias, penalties,
        // min_tokens masking) are sampled on the device where there is one; rows whose
        // log-probs are reported, and constrained rows (masked on the host), come to the
        // host whole. Prompt rows are scored where they are (`collect_prompt_logprobs`),
        // never copied.
        let mut plan = RowPlan {
            full: Vec::new(),
            on_device: Vec::new(),
        };
        for (s, step) in out.scheduled.iter().zip(&steps) {
            if step.all_logits {
                plan.full.extend(std::iter::repeat_n(false, step.tokens.len() - 1));
            }
            let row = plan.full.len() as u32;
            let live = self.requests.get(&s.id);
            let needs_row = s.samples && live.is_some_and(|l| !l.greedy_pick_suffices());
            let on_device = needs_row && self.device_sampling && live.is_some_and(Live::device_may_sample);
            if on_device {
                plan.on_device.push((row, s.id));
            }
            plan.full.push(needs_row && !on_device);
        }
        self.metrics
            .add_step_phase(StepPhase::Prepare, now.elapsed().as_secs_f64());
        (steps, plan)
    }

    /// Execute: one batched forward over the scheduled sequences, and the logits rows
    /// sampling needs fetched to the host. `None`: the forward failed, and the step's
    /// requests were failed and freed.
    fn execute(&mut self, out: &SchedulerOutput, steps: Vec<SeqStep>, plan: RowPlan) -> Option<Executed> {
        let forward = Instant::now();
        let queued = self.runner.step(self.scheduler.kv(), &steps);
        // The device samples while the host goes on: queued behind the forward, read
        // with the argmax picks.
        let queued = queued.and_then(|t| {
            let picks = self.queue_device_sampling(&t, &plan.on_device)?;
            Ok((t, picks))
        });
        let masking = Instant::now();
        self.metrics
            .add_step_phase(StepPhase::Forward, (masking - forward).as_secs_f64());
        // On CUDA the forward (and the device's sampling) is only queued: the masks are
        // computed while it runs. Constrained rows are never sampled on the device
        // (`prepare`): they come to the host whole and are masked there.
        let masks = self.compute_masks(out);
        let fetch = Instant::now();
        self.metrics
            .add_step_phase(StepPhase::Masks, (fetch - masking).as_secs_f64());
        let logits = queued.and_then(|(t, picks)| {
            let mut fetched = crate::runner::fetch_logits(&t, &plan.full)?;
            if let Some(picks) = picks {
                for (&(row, _), pick) in plan.on_device.iter().zip(picks.to_vec1::<u32>()?) {
                    fetched.sampled[row as usize] = Some(pick);
                }
            }
            Ok((t, fetched))
        });
        self.metrics
            .add_step_phase(StepPhase::Logits, fetch.elapsed().as_secs_f64());
        let (tensor, logits) = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("step failed: {e}");
                for s in &out.scheduled {
                    self.fail(s.id, &format!("inference failed: {e}"));
                }
                return None;
            }
        };
        Some(Executed {
            steps,
            tensor,
            logits,
            masks,
        })
    }

    /// The allowed tokens of every constrained request that picks a token this step,
    /// computed in parallel (each request's matcher is its own).
    fn compute_masks(&mut self, out: &SchedulerOutput) -> FxHashMap<RequestId, Result<TokenMask, String>> {
        use rayon::prelude::*;
        if self.num_constrained == 0 {
            return FxHashMap::default();
        }
        let picking: rustc_hash::FxHashSet<RequestId> =
            out.scheduled.iter().filter(|s| s.samples).map(|s| s.id).collect();
        let mut matchers: Vec<(RequestId, &mut ConstraintMatcher)> = self
            .requests
            .iter_mut()
            .filter(|(id, _)| picking.contains(id))
            .filter_map(|(id, l)| l.constraint.as_mut().map(|c| (*id, c)))
            .collect();
        match matchers.len() {
            0 => FxHashMap::default(),
            1 => matchers.iter_mut().map(|(id, m)| (*id, m.mask())).collect(),
            _ => matchers.par_iter_mut().map(|(id, m)| (*id, m.mask())).collect(),
        }
    }

    /// The rows of `on_device` sampled on the device, queued: their picks, one a row.
    fn queue_device_sampling(
        &mut self,
        logits: &candle_core::Tensor,
        on_device: &[(u32, RequestId)],
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        if on_device.is_empty() {
            return Ok(None);
        }
        let rows = self.device_rows(on_device, 0)?;
        crate::ops::sample_rows(logits, &rows).map(Some)
    }

    /// How the device samples each of these rows: each request's parameters, the draw
    /// of its pick (`ahead` picks after the next: 1 for a step launched behind one in
    /// flight), its bias and penalties, and (before its min_tokens) its stop tokens banned.
    fn device_rows(
        &self,
        on_device: &[(u32, RequestId)],
        ahead: usize,
    ) -> candle_core::Result<Vec<crate::ops::RowSample>> {
        let tokenizer = &self.tokenizer;
        let rows: Vec<crate::ops::RowSample> = on_device
            .iter()
            .filter_map(|&(row, id)| {
                let l = self.requests.get(&id)?;
                let o = &l.options;
                let pick = l.generated.len() + ahead;
                // Before min_tokens, EOS and stop tokens cannot be picked.
                let banned: Vec<u32> = if pick < o.min_tokens {
                    let eos = (!o.ignore_eos).then_some(&tokenizer.eos_ids);
                    o.stop_token_ids
                        .iter()
                        .chain(eos.into_iter().flatten())
                        .copied()
                        .collect()
                } else {
                    Vec::new()
                };
                Some(l.sampler.device_row(row, pick, banned))
            })
            .collect();
        if rows.len() != on_device.len() {
            candle_core::bail!("a sampled request is gone mid-step");
        }
        Ok(rows)
    }

    /// A launched step's picks for `rows` rows, when some are sampled (`on_device`, the
    /// others greedy): every row's [`crate::ops::RowSample`]. `None`: all are argmax picks.
    fn launch_rows(
        &self,
        rows: usize,
        on_device: &[(u32, RequestId)],
        ahead: usize,
    ) -> candle_core::Result<Option<Vec<crate::ops::RowSample>>> {
        if on_device.is_empty() {
            return Ok(None);
        }
        let mut all: Vec<crate::ops::RowSample> = (0..rows as u32).map(crate::ops::RowSample::greedy).collect();
        for r in self.device_rows(on_device, ahead)? {
            let i = r.row as usize;
            all[i] = r;
        }
        Ok(Some(all))
    }

    /// Update: each sequence's progress recorded, prompt log-probs scored, and a token
    /// sampled where the step ends a sequence's known tokens (stop checks, events out,
    /// finished requests freed).
    fn update(&mut self, out: &SchedulerOutput, mut ex: Executed) {
        let mut row = 0;
        for (s, step) in out.scheduled.iter().zip(&ex.steps) {
            let rows = if step.all_logits { step.tokens.len() } else { 1 };
            let range = row..row + rows;
            row += rows;
            self.scheduler.computed(s);
            if step.all_logits {
                if let Err(e) = self.collect_prompt_logprobs(s, &ex.tensor, range.start) {
                    if let Some(l) = self.requests.get(&s.id) {
                        self.outbox.send(
                            &l.events,
                            EngineOutput::Error(format!("scoring the prompt failed: {e}")),
                        );
                    }
                    self.finish(s.id, FinishReason::Abort);
                    continue;
                }
            }
            if s.samples {
                let last = range.end - 1;
                let mask = ex.masks.remove(&s.id);
                let pick = ex.logits.sampled[last].unwrap_or(ex.logits.argmax[last]);
                self.sample(s.id, ex.logits.rows[last].as_deref(), pick, mask);
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
            self.outbox.send(&l.events, EngineOutput::PromptLogprobs(done.clone()));
            // Keep a full-length marker so they are not sent again after a preemption.
            *acc = done;
        }
        Ok(())
    }

    /// The token a request picks from its row (or the device's pick: its argmax, or
    /// its sampled token) and its log-prob; a constrained request's grammar is advanced
    /// by it. `Ok(None)`: the request is gone. `Err`: its grammar failed, and the
    /// request must end.
    fn pick(
        &mut self,
        id: RequestId,
        logits: Option<&[f32]>,
        picked: u32,
        mask: Option<Result<TokenMask, String>>,
    ) -> Result<Option<(u32, Option<TokenLogprob>)>, String> {
        let Some(l) = self.requests.get_mut(&id) else {
            return Ok(None);
        };
        let mask = match (mask, l.constraint.as_mut()) {
            (Some(m), _) => Some(m?),
            // Not computed with the step's others (not expected): computed now.
            (None, Some(c)) => Some(c.mask()?),
            (None, None) => None,
        };
        let o = &l.options;
        let (token, logprob) = match logits {
            None => (picked, None),
            Some(logits) => {
                let adjusted;
                let mut scores = logits;
                // Logit bias, penalties and the grammar's mask, on a copy: the reported
                // log-probs stay the model's own distribution (vLLM's default, raw log-probs).
                if l.sampler.adjusts_logits() || mask.is_some() {
                    let mut row = logits.to_vec();
                    l.sampler.adjust(&mut row);
                    if let Some(m) = &mask {
                        m.apply(&mut row);
                    }
                    adjusted = row;
                    scores = &adjusted;
                }
                let masked;
                // Before min_tokens, EOS and stop tokens cannot be picked, unless the
                // grammar allows nothing else.
                if l.generated.len() < o.min_tokens {
                    let eos = if o.ignore_eos {
                        None
                    } else {
                        Some(&self.tokenizer.eos_ids)
                    };
                    masked = mask_tokens(
                        scores,
                        o.stop_token_ids.iter().chain(eos.into_iter().flatten()).copied(),
                    );
                    if mask.is_none() || masked.iter().any(|x| x.is_finite()) {
                        scores = &masked;
                    }
                }
                let token = l.sampler.sample(scores);
                (token, o.logprobs.map(|top| token_logprob(logits, token, top)))
            }
        };
        if let Some(c) = l.constraint.as_mut() {
            if !mask.as_ref().is_some_and(|m| m.allows(token)) {
                return Err(format!(
                    "no token of the model's row is allowed by the grammar (picked {token})"
                ));
            }
            c.accept(token)?;
        }
        Ok(Some((token, logprob)))
    }

    /// `logits`: the row, when the host samples the request; else `picked` (the
    /// device's argmax, or its sampled pick) is the token. `mask`: a constrained
    /// request's allowed tokens, computed during the forward.
    fn sample(&mut self, id: RequestId, logits: Option<&[f32]>, picked: u32, mask: Option<Result<TokenMask, String>>) {
        let picked = self.pick(id, logits, picked, mask);
        let (token, logprob) = match picked {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return self.fail(id, &format!("structured output: {e}")),
        };
        let Some(l) = self.requests.get_mut(&id) else { return };
        let o = &l.options;
        l.sampler.accept(token);
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
        // With a grammar, EOS comes only where the grammar allows it: it always ends.
        let constrained = l.constraint.is_some();
        let is_eos = (!o.ignore_eos || constrained) && self.tokenizer.eos_ids.contains(&token);
        let is_stop_token = o.stop_token_ids.contains(&token);
        let total = l.prompt_len + l.generated.len();
        // The grammar allows nothing more: the output is complete with this token.
        let complete = l.constraint.as_ref().is_some_and(|c| c.is_finished());
        let reason = if is_eos || is_stop_token || complete {
            Some(FinishReason::Stop)
        } else if l.generated.len() >= o.max_tokens || total >= self.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.outbox.send(
            &l.events,
            EngineOutput::Token {
                id: token,
                logprob,
                decode: !(is_eos || is_stop_token),
                last: reason.is_some(),
                cached_tokens: l.cached_tokens,
            },
        );
        match reason {
            Some(r) => self.finish(id, r),
            None => self.scheduler.append_token(id, token),
        }
    }

    /// Ends a request with an error event (then `Finished`, abort).
    fn fail(&mut self, id: RequestId, msg: &str) {
        if let Some(l) = self.requests.get(&id) {
            self.outbox.send(&l.events, EngineOutput::Error(msg.to_string()));
        }
        self.finish(id, FinishReason::Abort);
    }

    /// Ends a request: frees its blocks and sends `Finished`.
    fn finish(&mut self, id: RequestId, reason: FinishReason) {
        if let Err(e) = self.scheduler.remove(id) {
            tracing::error!("freeing request {id}: {e}");
        }
        let Some(l) = self.requests.remove(&id) else { return };
        self.num_constrained -= usize::from(l.constraint.is_some());
        self.metrics
            .e2e_request_latency_seconds
            .observe(l.arrival.elapsed().as_secs_f64());
        let usage = Usage {
            prompt_tokens: l.prompt_len,
            completion_tokens: l.generated.len(),
            cached_tokens: l.cached_tokens,
        };
        self.outbox.send(&l.events, EngineOutput::Finished { reason, usage });
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
