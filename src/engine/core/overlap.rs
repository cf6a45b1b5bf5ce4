//! Async scheduling: a decode step is launched and not waited for; while the device
//! runs it, the engine launches the next one, whose token ids are the launched step's
//! picks, still on the device. Only then does the host read the first step's picks and
//! do its update (tokens, events, finished requests) — the host work of a step hides
//! behind the device's work on the next.
//!
//! The next step can be launched before its tokens are known when it is the same decode
//! batch one position further: every request picked on the device with nothing read
//! from its logits row on the host (no log-probs, no grammar mask) and nothing of the
//! pick depending on the token before (no penalty, no `min_tokens` mask left), nobody waiting to be
//! admitted, and a block for every next position without preempting. A request whose picked token
//! turns out to end it (EOS, a stop token) was launched one step too far: that row's
//! result is dropped, as vLLM does; its blocks are freed when it finishes, and anything
//! that reuses them runs after the step on the device's one stream. A request that ends
//! by length is known in advance and is not carried on.

use super::{Engine, Executed, RowPlan};
use crate::engine::scheduler::SchedulerOutput;
use crate::engine::RequestId;
use crate::metrics::StepPhase;
use crate::runner::{LaunchedDecode, SeqStep, StepLogits};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A decode step on the device, not yet updated.
pub(super) struct InFlight {
    out: SchedulerOutput,
    steps: Vec<SeqStep>,
    launched: LaunchedDecode,
}

impl Engine {
    /// Launches the step without waiting for it, when async scheduling is on and it is a
    /// decode step the runner can launch so (a CUDA graph, every row picked on the
    /// device); else hands `out` and `steps` back to run synchronously.
    pub(super) fn launch(
        &mut self,
        out: SchedulerOutput,
        steps: Vec<SeqStep>,
        plan: &RowPlan,
    ) -> Result<(), (SchedulerOutput, Vec<SeqStep>)> {
        let decode = steps.iter().all(|s| s.tokens.len() == 1 && !s.all_logits)
            && out.scheduled.iter().all(|s| s.samples)
            && !plan.full.iter().any(|&f| f);
        if !self.async_scheduling || !decode {
            return Err((out, steps));
        }
        let t = Instant::now();
        let launched = self.launch_rows(steps.len(), &plan.on_device, 0).and_then(|rows| {
            self.runner
                .launch_decode(self.scheduler.kv(), &steps, None, rows.as_deref())
        });
        self.metrics
            .add_step_phase(StepPhase::Forward, t.elapsed().as_secs_f64());
        match launched {
            Ok(Some(launched)) => {
                self.in_flight = Some(InFlight { out, steps, launched });
                Ok(())
            }
            Ok(None) => Err((out, steps)),
            Err(e) => {
                // The synchronous path runs it again and reports what fails there.
                tracing::warn!("launching a decode step failed: {e}; running it synchronously");
                Err((out, steps))
            }
        }
    }

    /// Completes the step in flight: launches the next one first when it can be known
    /// now, then waits for this one's picks and updates. The tokens the completed step
    /// ran.
    pub(super) fn complete(&mut self, f: InFlight) -> usize {
        self.in_step = f.out.scheduled.iter().map(|s| s.id).collect();
        let t = Instant::now();
        let next = self.next_decode(&f);
        self.metrics
            .add_step_phase(StepPhase::Schedule, t.elapsed().as_secs_f64());
        let next = next.and_then(|(out, steps, ids, on_device)| {
            let t = Instant::now();
            let launched = self.launch_rows(steps.len(), &on_device, 1).and_then(|rows| {
                self.runner
                    .launch_decode(self.scheduler.kv(), &steps, Some(&ids), rows.as_deref())
            });
            self.metrics
                .add_step_phase(StepPhase::Forward, t.elapsed().as_secs_f64());
            match launched {
                Ok(Some(launched)) => Some(InFlight { out, steps, launched }),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!("launching the next decode step failed: {e}; it is scheduled again");
                    None
                }
            }
        });
        let t = Instant::now();
        let n = f.steps.len();
        let waited = self.runner.wait_decode(f.launched);
        self.metrics
            .add_step_phase(StepPhase::Logits, t.elapsed().as_secs_f64());
        let t = Instant::now();
        match waited {
            Ok((tensor, picks)) => {
                let ex = Executed {
                    steps: f.steps,
                    tensor,
                    logits: StepLogits {
                        argmax: picks,
                        rows: vec![None; n],
                        sampled: vec![None; n],
                    },
                    // A constrained request is never launched ahead: neither
                    // `greedy_pick_suffices` nor `device_pick_suffices_after` holds for it.
                    masks: Default::default(),
                };
                self.update(&f.out, ex);
            }
            Err(e) => {
                tracing::error!("step failed: {e}");
                for s in &f.out.scheduled {
                    self.fail(s.id, &format!("inference failed: {e}"));
                }
            }
        }
        self.metrics
            .add_step_phase(StepPhase::Update, t.elapsed().as_secs_f64());
        self.in_flight = next;
        n
    }

    /// The step after `f`, when it can be launched before `f`'s picks are read: the same
    /// decode batch one position further, less the requests `f` ends by length. Its
    /// blocks are allocated here; its token ids are `f`'s picks, rows chosen; and the
    /// rows the device samples.
    #[allow(clippy::type_complexity)]
    fn next_decode(
        &mut self,
        f: &InFlight,
    ) -> Option<(
        SchedulerOutput,
        Vec<SeqStep>,
        candle_core::Tensor,
        Vec<(u32, RequestId)>,
    )> {
        if self.scheduler.num_waiting() > 0 || self.pending_adds.load(Ordering::Relaxed) > 0 || self.fault.is_some() {
            return None;
        }
        let mut rows = Vec::new();
        let mut carried = Vec::new();
        let mut on_device = Vec::new();
        for (row, s) in f.out.scheduled.iter().enumerate() {
            let Some(l) = self.requests.get(&s.id) else { continue };
            // Counting the token `f` picks for it.
            let generated = l.generated.len() + 1;
            let ends_by_length = generated >= l.options.max_tokens || l.prompt_len + generated >= self.max_model_len;
            let greedy = l.greedy_pick_suffices_after(generated);
            let sampled = !greedy && self.device_sampling && l.device_pick_suffices_after(generated);
            if ends_by_length || !(greedy || sampled) {
                continue;
            }
            if sampled {
                on_device.push((carried.len() as u32, s.id));
            }
            rows.push(row as u32);
            carried.push(s);
        }
        if carried.is_empty() {
            return None;
        }
        let out = self.scheduler.continue_decode(&carried)?;
        let steps = out
            .scheduled
            .iter()
            .map(|s| SeqStep {
                seq: s.id,
                tokens: s.tokens.clone(),
                start_pos: s.start,
                all_logits: false,
            })
            .collect();
        let picks = &f.launched.picks;
        let ids = if rows.len() == f.out.scheduled.len() {
            picks.clone()
        } else {
            let rows = candle_core::Tensor::new(rows.as_slice(), picks.device()).ok()?;
            picks.index_select(&rows, 0).ok()?
        };
        Some((out, steps, ids, on_device))
    }
}
