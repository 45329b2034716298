//! `grpc.health.v1.Health` as a rolling update needs it: one status for every service of the server, that
//! flips for all of them at once, and `Watch` streams that end as soon as the server starts draining, so
//! that a load balancer's open watch never holds a drain open to its deadline.

use std::collections::BTreeSet;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// What the server says about itself now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Not ready yet (loading), or no healthy worker.
    NotServing,
    /// Ready for traffic.
    Serving,
    /// Shutting down: not serving, and watch streams end.
    Draining,
}

/// Sets the status of every service at once.
#[derive(Clone)]
pub struct HealthSwitch {
    status: watch::Sender<Serving>,
}

impl HealthSwitch {
    /// Sets the status; `Draining` is final.
    pub fn set(&self, status: Serving) {
        self.status.send_if_modified(|s| {
            let changed = *s != status && *s != Serving::Draining;
            if changed {
                *s = status;
            }
            changed
        });
    }

    /// The status now.
    pub fn get(&self) -> Serving {
        *self.status.borrow()
    }
}

/// The health service over a fixed set of service names ("" is the server as a whole).
pub struct HealthService {
    services: BTreeSet<String>,
    status: watch::Receiver<Serving>,
}

/// A health service for `services` (plus ""), starting NOT_SERVING, and the switch that drives it.
pub fn health_service(services: &[&str]) -> (HealthSwitch, HealthServer<HealthService>) {
    let (tx, rx) = watch::channel(Serving::NotServing);
    let mut names: BTreeSet<String> = services.iter().map(|s| s.to_string()).collect();
    names.insert(String::new());
    (
        HealthSwitch { status: tx },
        HealthServer::new(HealthService {
            services: names,
            status: rx,
        }),
    )
}

fn wire(s: Serving) -> i32 {
    match s {
        Serving::Serving => ServingStatus::Serving as i32,
        Serving::NotServing | Serving::Draining => ServingStatus::NotServing as i32,
    }
}

type WatchStreamOut = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

impl HealthService {
    fn known(&self, service: &str) -> Result<(), Status> {
        if self.services.contains(service) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "unknown service `{}`; this server reports on: {}",
                echo(service),
                self.services
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// A client's service name, shortened for a message.
fn echo(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_debug).collect()
}

#[tonic::async_trait]
impl Health for HealthService {
    type WatchStream = WatchStreamOut;

    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.known(&request.get_ref().service)?;
        Ok(Response::new(HealthCheckResponse {
            status: wire(*self.status.borrow()),
        }))
    }

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.known(&request.get_ref().service)?;
        // The current status, then each change; the stream ends once draining has been reported.
        let statuses = WatchStream::new(self.status.clone());
        let stream = statuses
            .take_while(|s| futures::future::ready(*s != Serving::Draining))
            .chain(futures::stream::once(async { Serving::Draining }))
            .map(|s| Ok(HealthCheckResponse { status: wire(s) }));
        Ok(Response::new(stream.boxed()))
    }
}
