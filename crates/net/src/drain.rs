//! How a server stops, in the order a rolling update needs:
//! 1. the shutdown signal arrives: every health service turns NOT_SERVING and health watch streams end,
//!    while the listener keeps accepting for the pre-stop delay, so that load balancers notice first;
//! 2. the server stops accepting and sends GOAWAY; streams in flight go on;
//! 3. at the drain deadline every stream still open is cut off: its handler is told ([`DrainWatch`]) and
//!    ends it with UNAVAILABLE, saying how far it got, and the server stops a moment later.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use crate::health::{HealthSwitch, Serving};

/// After the cut-off, how long handlers get to send their last status before the server stops anyway.
const CUTOFF_GRACE: Duration = Duration::from_secs(1);

/// Where a server is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving normally.
    Serving,
    /// Shutting down: not serving, in-flight work finishing.
    Draining,
    /// The drain deadline passed: whatever is still open ends now.
    CutOff,
}

/// How long each part of a drain may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPlan {
    /// After the signal, how long the listener keeps accepting (with health NOT_SERVING).
    pub prestop: Duration,
    /// After that, how long streams in flight may run.
    pub timeout: Duration,
}

/// Follows a server's shutdown, for handlers with streams open.
#[derive(Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<Phase>,
}

impl DrainWatch {
    /// Resolves once the phase reaches `phase` (or the server is gone).
    pub fn reached(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|p| *p >= phase).await;
        }
    }
}

/// Drives one server's shutdown.
pub struct Drain {
    plan: DrainPlan,
    phase: watch::Sender<Phase>,
    health: HealthSwitch,
}

impl Drain {
    /// A drain for a server whose health `health` reports.
    pub fn new(plan: DrainPlan, health: HealthSwitch) -> Drain {
        Drain {
            plan,
            phase: watch::Sender::new(Phase::Serving),
            health,
        }
    }

    /// For handlers: when draining starts and when streams are cut off.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            rx: self.phase.subscribe(),
        }
    }

    /// The future to give the server as its shutdown signal: after `shutdown`, health turns NOT_SERVING
    /// (watch streams end) and the pre-stop delay passes; then the server stops accepting.
    pub fn signal(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (phase, health, prestop) = (self.phase.clone(), self.health.clone(), self.plan.prestop);
        async move {
            shutdown.await;
            tracing::info!(
                ?prestop,
                "shutting down: NOT_SERVING now, still accepting for the pre-stop delay"
            );
            health.set(Serving::Draining);
            phase.send_replace(Phase::Draining);
            tokio::time::sleep(prestop).await;
            tracing::info!("no new connections; draining streams");
        }
    }

    /// Runs `server` to its end, cutting off what is still open once the drain deadline passes.
    pub async fn run<E>(&self, server: impl Future<Output = Result<(), E>>) -> Result<(), E> {
        tokio::pin!(server);
        let mut phase = self.phase.subscribe();
        tokio::select! {
            r = &mut server => return r,
            _ = phase.wait_for(|p| *p >= Phase::Draining) => {}
        }
        let deadline = self.plan.prestop + self.plan.timeout;
        if let Ok(r) = tokio::time::timeout(deadline, &mut server).await {
            return r;
        }
        tracing::warn!(timeout = ?self.plan.timeout, "drain timeout passed; ending the streams still open with UNAVAILABLE");
        self.phase.send_replace(Phase::CutOff);
        match tokio::time::timeout(CUTOFF_GRACE, &mut server).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}
