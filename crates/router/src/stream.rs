//! The client's side of `GenerateStream`: reading the worker and writing the client are two tasks, so a
//! slow client never holds what a request holds on the server.
//!
//! - The **relay task** reads the worker as fast as it produces, through [`Relay`] (output filter,
//!   migration, deadline, drain). Its messages wait in a channel bounded by the request itself (one message
//!   per generated token, a flush and the end). When the worker's last event is relayed the task ends and
//!   drops the relay: the admission permit was settled and the worker lease is released, while the client
//!   may still be reading, and the worker's HTTP/2 window never fills behind one reader.
//! - The **writer task** hands those messages to the client. A client that takes nothing for the stall
//!   timeout, or is still behind at its deadline, is given up on: the writer stops, which drops the relay
//!   (generation stops, the slot returns), and the stream ends with a status saying why, after whatever the
//!   client had not read yet.

use std::time::Duration;

use ferroserve_proto::v1 as pb;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::relay::{Relay, Relayed};

/// One message for the client.
type Message = Result<pb::GenerateStreamResponse, Status>;

/// Messages the client has not taken yet, in the transport's own buffer.
const CLIENT_BUFFER: usize = 32;

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

/// Starts relaying one request; returns the stream to give the client. `max_messages` bounds what waits
/// between the two tasks (the request's own maximum number of messages).
pub(crate) fn relay_to_client(
    relay: Relay,
    max_messages: usize,
    stall: Duration,
) -> impl Stream<Item = Message> + Send + 'static {
    let deadline = relay.deadline().map(Instant::from_std);
    let (items_tx, items_rx) = mpsc::channel(max_messages.max(1));
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let (end_tx, end_rx) = oneshot::channel();
    tokio::spawn(read_worker(relay, items_tx));
    tokio::spawn(write_client(items_rx, tx, end_tx, stall, deadline));
    // What the writer could not deliver in time ends the stream after the messages already handed over.
    let end = futures::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
    ReceiverStream::new(rx).chain(end)
}

/// The relay task: every item in order until the end, or until the writer is gone (the relay is then
/// dropped, which cancels the generation and settles the request as abandoned).
async fn read_worker(mut relay: Relay, items: mpsc::Sender<Relayed>) {
    loop {
        let item = tokio::select! {
            biased;
            () = items.closed() => return,
            item = relay.next() => item,
        };
        let Some(item) = item else { return };
        let last = matches!(item, Relayed::Done(_));
        if items.send(item).await.is_err() || last {
            return;
        }
    }
}

/// The writer task: hands messages to the client, each within the stall timeout and the deadline.
async fn write_client(
    mut items: mpsc::Receiver<Relayed>,
    tx: mpsc::Sender<Message>,
    end: oneshot::Sender<Status>,
    stall: Duration,
    deadline: Option<Instant>,
) {
    loop {
        let item = tokio::select! {
            // The client left: returning drops `items`, and the relay task stops.
            () = tx.closed() => return,
            item = items.recv() => item,
        };
        let Some(item) = item else { return };
        let limit = deadline.map_or(Instant::now() + stall, |d| d.min(Instant::now() + stall));
        match tokio::time::timeout_at(limit, tx.send(message(item))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let status = if deadline.is_some_and(|d| d <= Instant::now()) {
                    Status::deadline_exceeded("the request's deadline passed while the client was not reading")
                } else {
                    tracing::info!(?stall, "client stopped reading; giving up on it");
                    metrics::counter!(ferroserve_telemetry::names::CLIENT_STALLS_TOTAL).increment(1);
                    Status::unavailable(format!(
                        "the client took no message for {} s; the stream was ended",
                        stall.as_secs_f64()
                    ))
                };
                let _ = end.send(status);
                return;
            }
        }
    }
}
