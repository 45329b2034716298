//! The engine thread under supervision. A panic inside a step (a bug, a corrupt model) must not leave a
//! server that says SERVING and fails every request: the supervisor catches it, ends every request the
//! engine held with UNAVAILABLE (the router sends them to another worker, or continues them there), and
//! starts the loop again. After `MAX_RESTARTS` panics within `RESTART_WINDOW` it gives up: the engine is
//! marked dead, which ends its stats stream, so its pool member turns unhealthy and health NOT_SERVING.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ferroserve_core::BackendError;
use ferroserve_telemetry::names;

use crate::run::{EngineLoop, Queues};
use crate::seq::Job;

/// Restarts tolerated within [`RESTART_WINDOW`] before the engine is declared dead.
const MAX_RESTARTS: usize = 3;
/// The window restarts are counted over.
const RESTART_WINDOW: Duration = Duration::from_secs(60);

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `engine` on this thread until every handle is gone, restarting it after a panic.
pub(crate) fn supervise(mut engine: EngineLoop, queue: Receiver<Job>) {
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let mut queues = Queues::default();
        let Err(panic) = catch_unwind(AssertUnwindSafe(|| engine.run(&queue, &mut queues))) else {
            return;
        };
        let why = panic_text(panic.as_ref());
        let failed = BackendError::Unavailable("the engine failed mid-request and restarted; retry".into());
        let lost = queues.fail_all(&engine.shared, &failed);
        metrics::counter!(names::ENGINE_RESTARTS_TOTAL).increment(1);
        let now = Instant::now();
        restarts.push_back(now);
        restarts.retain(|t| now.duration_since(*t) <= RESTART_WINDOW);
        if restarts.len() > MAX_RESTARTS {
            tracing::error!(%why, lost, "engine thread panicked again; {MAX_RESTARTS} restarts within a minute, giving up");
            engine.shared.die();
            // Whatever is still queued gets the same answer; later submits find the queue closed.
            let gone = BackendError::Unavailable("the engine has stopped after repeated failures".into());
            while let Ok(job) = queue.try_recv() {
                let _ = job.events.try_send(Err(gone.clone()));
                engine.shared.update(|s| s.waiting -= 1);
            }
            return;
        }
        tracing::error!(%why, lost, "engine thread panicked; requests it held end with UNAVAILABLE; restarting");
    }
}
