//! What the chaos suite (`tests/chaos.rs`) and the chaos bench (`benches/chaos.rs`) share: configs that
//! notice faults quickly, the processes started with them, streams followed to their end, and the
//! router's pool followed until it changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroserve_proto::v1 as pb;
use tokio::sync::watch;

use super::procs::{Proc, spawn, wait_workers_healthy};
use super::{WAIT, client, model_path, wait_serving};

/// A router that notices faults quickly: heartbeat silence of 2 s ejects a worker, a worker silent on a
/// request for 10 s loses it, a client that reads nothing for 3 s is given up on.
pub fn router_config() -> String {
    r#"
[server]
listen = "127.0.0.1:0"
metrics_listen = ""
http_listen = ""
drain_timeout_secs = 30.0
[router]
worker_heartbeat_timeout_secs = 2.0
worker_stall_timeout_secs = 10.0
client_stall_timeout_secs = 3.0
[connections]
keepalive_interval_secs = 2.0
keepalive_timeout_secs = 2.0
"#
    .to_string()
}

/// Workers batch at most 4 sequences, so that some requests wait in their queues.
pub const WORKER_CONFIG: &str = r#"
[worker]
listen = "127.0.0.1:0"
metrics_listen = ""
[engine]
max_batch_seqs = 4
"#;

/// `ferroserve worker` with `config` and the real model, SERVING when this returns.
pub async fn start_worker(config: &str, extra: &[&str]) -> Proc {
    let model = model_path();
    let args = [
        &["worker", "--config", config, "--model-path", model.to_str().unwrap()][..],
        extra,
    ]
    .concat();
    let w = spawn(&args).await;
    wait_serving(&w.url).await;
    w
}

/// `ferroserve router` in front of `workers`, with all of them healthy when this returns.
pub async fn start_router(config: &str, workers: &[&str]) -> Proc {
    let mut args = vec!["router", "--config", config];
    for w in workers {
        args.extend(["--worker", w]);
    }
    let r = spawn(&args).await;
    wait_serving(&r.url).await;
    wait_workers_healthy(&r.url, workers.len()).await;
    r
}

/// How a stream ended, as the client saw it.
#[derive(Debug)]
pub enum End {
    Complete(pb::GenerationComplete),
    Status(tonic::Status),
    /// OK with no completion: never acceptable.
    NoCompletion,
}

/// What a client got from one stream.
#[derive(Debug)]
pub struct Outcome {
    /// Every token id received, in order.
    pub ids: Vec<u32>,
    /// Every text received, in order.
    pub text: String,
    pub end: End,
    /// Sent to end.
    pub took: Duration,
    /// Sent to the first token, if one came.
    pub ttft: Option<Duration>,
    /// The longest wait for a token (from the request, or the token before).
    pub largest_gap: Duration,
}

/// Runs one streaming request to its end (bounded), counting its tokens into `tokens`.
pub async fn run_stream(url: String, request: pb::GenerateRequest, tokens: Arc<watch::Sender<usize>>) -> Outcome {
    use pb::generate_stream_response::Event;
    let started = Instant::now();
    let mut c = client(&url).await;
    let mut out = Outcome {
        ids: Vec::new(),
        text: String::new(),
        end: End::NoCompletion,
        took: Duration::ZERO,
        ttft: None,
        largest_gap: Duration::ZERO,
    };
    let mut last = started;
    let run = async {
        let mut stream = match c.generate_stream(request).await {
            Ok(s) => s.into_inner(),
            Err(status) => return End::Status(status),
        };
        loop {
            match stream.message().await {
                Ok(Some(msg)) => match msg.event {
                    Some(Event::Token(t)) => {
                        let now = Instant::now();
                        out.largest_gap = out.largest_gap.max(now - last);
                        out.ttft.get_or_insert(now - started);
                        last = now;
                        out.ids.extend_from_slice(&t.token_ids);
                        out.text.push_str(&t.text);
                        tokens.send_modify(|n| *n += 1);
                    }
                    Some(Event::Complete(c)) => return End::Complete(c),
                    None => {}
                },
                Ok(None) => return End::NoCompletion,
                Err(status) => return End::Status(status),
            }
        }
    };
    out.end = tokio::time::timeout(WAIT, run).await.expect("the stream ended in time");
    out.took = started.elapsed();
    out
}

/// Starts `requests` as concurrent streams; returns their handles and the running token count.
pub fn start_streams(
    url: &str,
    requests: Vec<pb::GenerateRequest>,
) -> (Vec<tokio::task::JoinHandle<Outcome>>, watch::Receiver<usize>) {
    let tokens = Arc::new(watch::Sender::new(0));
    let rx = tokens.subscribe();
    let handles = requests
        .into_iter()
        .map(|r| tokio::spawn(run_stream(url.to_string(), r, Arc::clone(&tokens))))
        .collect();
    (handles, rx)
}

/// Every stream's outcome, in the order started.
pub async fn outcomes(handles: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut all = Vec::new();
    for h in handles {
        all.push(h.await.expect("stream task"));
    }
    all
}

/// Waits (bounded) until `n` token messages have arrived over all streams.
pub async fn until_tokens(tokens: &mut watch::Receiver<usize>, n: usize) {
    tokio::time::timeout(WAIT, tokens.wait_for(|t| *t >= n))
        .await
        .expect("tokens flowed in time")
        .unwrap();
}
