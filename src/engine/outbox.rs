//! Where the engine thread's events go out. Handing an event to a request's channel
//! wakes the task reading it, a cost paid once per request per step; the engine thread
//! only queues a step's events, and one delivery thread hands them over, in order, while
//! the engine runs the next step.

use super::request::EngineOutput;
use std::sync::mpsc;
use tokio::sync::mpsc::UnboundedSender;

type Addressed = (UnboundedSender<EngineOutput>, EngineOutput);

pub(super) struct Outbox {
    pending: Vec<Addressed>,
    /// To the delivery thread; `None` if it could not be started (events then go out
    /// from the engine thread).
    delivery: Option<mpsc::Sender<Vec<Addressed>>>,
}

impl Outbox {
    /// Starts the delivery thread (`crosskv-events`).
    pub(super) fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Vec<Addressed>>();
        let started = std::thread::Builder::new()
            .name("crosskv-events".into())
            .spawn(move || {
                for batch in rx {
                    for (to, out) in batch {
                        let _ = to.send(out);
                    }
                }
            });
        if let Err(e) = &started {
            tracing::warn!("no event delivery thread ({e}); the engine thread delivers its events");
        }
        Outbox {
            pending: Vec::new(),
            delivery: started.ok().map(|_| tx),
        }
    }

    /// Queues `out` for the request whose channel is `to`. A request's events keep
    /// their order: every one goes through here.
    pub(super) fn send(&mut self, to: &UnboundedSender<EngineOutput>, out: EngineOutput) {
        self.pending.push((to.clone(), out));
    }

    /// Hands what was queued to the delivery thread.
    pub(super) fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        let undelivered = match &self.delivery {
            Some(tx) => tx.send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        for (to, out) in undelivered.into_iter().flatten() {
            let _ = to.send(out);
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush();
    }
}
