//! The client's side of `GenerateStream`: reading the worker and writing the client are decoupled, so a
//! slow client never holds what a request holds on the server.
//!
//! The relay is read as fast as the worker produces: its events wait in a buffer the request bounds
//! (one message per generated token, plus a flush and the completion), so the admission permit is settled
//! and the worker lease released the moment the worker's completion arrives, and the worker's HTTP/2
//! window never fills behind one reader. Writing to the client is bounded by the stall timeout: a client
//! that takes nothing for that long while messages wait is given up on; its generation is cancelled, its
//! slot and lease are returned.

use std::collections::VecDeque;
use std::time::Duration;

use ferroserve_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use crate::relay::{Relay, Relayed};

/// One message for the client.
type Message = Result<pb::GenerateStreamResponse, Status>;

fn message(item: Relayed) -> Message {
    use pb::generate_stream_response::Event as Out;
    match item {
        Relayed::Token(t) => Ok(pb::GenerateStreamResponse {
            event: Some(Out::Token(t)),
        }),
        Relayed::Done(Ok(c)) => Ok(pb::GenerateStreamResponse {
            event: Some(Out::Complete(c)),
        }),
        Relayed::Done(Err(status)) => Err(status),
    }
}

/// Relays one request to its client until the end, the client's departure, or a stall.
pub(crate) async fn forward(relay: Relay, tx: mpsc::Sender<Message>, stall: Duration) {
    let mut pending: VecDeque<Message> = VecDeque::new();
    // The relay until the worker's last event; dropped then, which releases the worker lease while the
    // client may still be reading (the admission permit was settled when the relay produced `Done`).
    let deadline = relay.deadline().map(Instant::from_std);
    let mut relay = Some(relay);
    // When the client last took a message, or when a message started waiting for it.
    let mut progress = Instant::now();
    let abandon = |relay: Option<Relay>, status: Status| {
        if let Some(mut relay) = relay {
            relay.abandon(status);
        }
    };
    loop {
        if relay.is_none() && pending.is_empty() {
            return;
        }
        let waiting = !pending.is_empty();
        tokio::select! {
            biased;
            () = tx.closed() => {
                abandon(relay, Status::cancelled("client disconnected"));
                return;
            }
            permit = tx.reserve(), if waiting => match permit {
                Ok(permit) => {
                    permit.send(pending.pop_front().expect("a message waits"));
                    progress = Instant::now();
                }
                Err(_) => {
                    abandon(relay, Status::cancelled("client disconnected"));
                    return;
                }
            },
            item = next(&mut relay), if relay.is_some() => match item {
                None => relay = None,
                Some(item) => {
                    if matches!(item, Relayed::Done(_)) {
                        relay = None;
                    }
                    if pending.is_empty() {
                        progress = Instant::now();
                    }
                    pending.push_back(message(item));
                }
            },
            () = until(deadline), if waiting => {
                // The client's deadline passed with messages still waiting for it: nothing later helps.
                abandon(relay, Status::deadline_exceeded("the request's deadline passed while the client was not reading"));
                return;
            }
            () = tokio::time::sleep_until(progress + stall), if waiting => {
                tracing::info!(stall = ?stall, waiting = pending.len(), "client stopped reading; giving up on it");
                metrics::counter!(ferroserve_telemetry::names::CLIENT_STALLS_TOTAL).increment(1);
                abandon(relay, Status::unavailable(format!(
                    "the client took no message for {} s; the stream was ended",
                    stall.as_secs_f64()
                )));
                return;
            }
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The relay's next item; only polled while there is a relay.
async fn next(relay: &mut Option<Relay>) -> Option<Relayed> {
    match relay {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}
