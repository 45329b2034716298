//! `ferroserve serve` end to end: the real model behind the real router on 127.0.0.1, over gRPC.

mod support;

use std::time::Duration;

use ferroserve_core::WorkerStats;
use ferroserve_proto::v1 as pb;
use futures::StreamExt;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answer_mentions_paris_and_streams_token_by_token() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let (tokens, done) = stream_all(&mut c, chat("What is the capital of France?", 48)).await;
    let text = text_of(&tokens);
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert!(
        tokens.len() >= 3,
        "expected several token messages, got {}",
        tokens.len()
    );
    assert!(
        tokens.iter().all(|t| t.token_ids.len() <= 1),
        "tokens must not be buffered"
    );
    let usage = done.usage.expect("usage");
    assert!(usage.prompt_tokens > 10);
    assert_eq!(
        usage.completion_tokens as usize,
        tokens.iter().map(|t| t.token_ids.len()).sum::<usize>()
    );
    assert_eq!(done.model_version, "smollm2-135m-instruct@q4_1");
    assert!(
        done.request_id.starts_with("req-"),
        "server makes an id: {}",
        done.request_id
    );
    let t = done.timings.expect("timings");
    assert!(t.time_to_first_token_ms > 0.0 && t.time_to_first_token_ms <= t.total_ms);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_matches_stream_and_echoes_request_id() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let mut req = chat("Name a colour.", 12);
    req.request_id = "my-id-7".into();
    let unary = c.generate(req.clone()).await.expect("unary").into_inner();
    let (tokens, done) = stream_all(&mut c, req).await;
    assert_eq!(
        unary.text,
        text_of(&tokens),
        "greedy is deterministic across call styles"
    );
    assert_eq!(unary.request_id, "my-id-7");
    assert_eq!(done.request_id, "my-id-7");
    let (first, second) = (unary.usage.unwrap(), done.usage.unwrap());
    assert_eq!(
        (first.prompt_tokens, first.completion_tokens),
        (second.prompt_tokens, second.completion_tokens)
    );
    // The second call found the first one's prompt in the prefix cache: every full 16-token block
    // before its last token, and the same text.
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(second.cached_tokens, (second.prompt_tokens - 1) / 16 * 16);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_text_and_stop_strings_end_generation() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let sampled = |seed| {
        let mut r = chat("Write a short poem about the sea.", 24);
        r.sampling = Some(pb::SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            top_k: 40,
            seed: Some(seed),
            repetition_penalty: Some(1.1),
            ignore_eos: false,
            ..Default::default()
        });
        r
    };
    let (a, _) = stream_all(&mut c, sampled(1234)).await;
    let (b, _) = stream_all(&mut c, sampled(1234)).await;
    assert_eq!(text_of(&a), text_of(&b));
    let (d, _) = stream_all(&mut c, sampled(999)).await;
    assert_ne!(text_of(&a), text_of(&d), "a different seed should sample differently");

    // A stop string taken from the greedy output, spanning two tokens, ends the stream before it.
    let (greedy, _) = stream_all(&mut c, chat("What is the capital of France?", 24)).await;
    let pieces: Vec<&str> = greedy.iter().map(|t| t.text.as_str()).collect();
    let i = (1..pieces.len())
        .find(|&i| pieces[i - 1].len() >= 2 && pieces[i].len() >= 2 && pieces[i - 1].is_ascii() && pieces[i].is_ascii())
        .expect("two ascii tokens in the answer");
    let before: String = pieces[..i - 1].concat();
    let stop = format!("{}{}", &pieces[i - 1][pieces[i - 1].len() - 1..], &pieces[i][..1]);
    let mut req = chat("What is the capital of France?", 24);
    req.stop = vec![stop.clone()];
    let (stopped, done) = stream_all(&mut c, req).await;
    assert_eq!(done.finish_reason, pb::FinishReason::Stop as i32);
    let text = text_of(&stopped);
    assert!(!text.contains(&stop), "stop string {stop:?} leaked into {text:?}");
    let full = greedy.iter().map(|t| t.text.as_str()).collect::<String>();
    let expected = &full[..full.find(&stop).expect("stop occurs in greedy output")];
    assert_eq!(text, expected, "text before the stop string (prefix {before:?})");

    // max_tokens ends with LENGTH and exactly that many tokens.
    let (_, done) = stream_all(&mut c, chat("Count from one to fifty in words.", 5)).await;
    assert_eq!(done.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(done.usage.unwrap().completion_tokens, 5);
    server.shutdown().await.unwrap();
}

/// Waits (bounded) until the engine's counters satisfy `pred`, following its stats stream.
async fn wait_stats(server: &ferroserve::running::Running, pred: impl Fn(&WorkerStats) -> bool) -> WorkerStats {
    let mut stats = server.backend.get().expect("engine loaded").watch_stats();
    tokio::time::timeout(WAIT, async {
        while let Some(s) = stats.next().await {
            if pred(&s) {
                return s;
            }
        }
        panic!("stats stream ended");
    })
    .await
    .expect("condition reached in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_request_gives_the_same_text_alone_and_in_a_batch() {
    let server = start_serve().await;
    let c = client(&server.url()).await;
    let seeded = || {
        let mut r = chat("Write a short poem about the sea.", 20);
        r.sampling = Some(pb::SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            top_k: 40,
            repetition_penalty: Some(1.1),
            seed: Some(77),
            ignore_eos: true,
            ..Default::default()
        });
        r
    };
    let (alone, _) = stream_all(&mut c.clone(), seeded()).await;
    // The same request among three others that join the batch with prompts of other lengths and their own
    // sampling: greedy, greedy with a repetition penalty, and hot unseeded top-k. Each sequence samples
    // with its own settings and random stream.
    let others = [
        ("Count from one to ten.", None),
        (
            "What is the capital of Italy?",
            Some(pb::SamplingParams {
                repetition_penalty: Some(1.3),
                ..Default::default()
            }),
        ),
        (
            "Name three colors of the rainbow.",
            Some(pb::SamplingParams {
                temperature: 1.5,
                top_k: 5,
                ..Default::default()
            }),
        ),
    ];
    let mut tasks = Vec::new();
    for (text, sampling) in others {
        let mut c = c.clone();
        let mut req = chat(text, 16);
        req.sampling = sampling;
        tasks.push(tokio::spawn(async move { stream_all(&mut c, req).await }));
    }
    let (batched, done) = stream_all(&mut c.clone(), seeded()).await;
    for t in tasks {
        let (_, d) = t.await.expect("task");
        assert!(d.usage.expect("usage").completion_tokens > 0);
    }
    assert_eq!(
        text_of(&alone),
        text_of(&batched),
        "the seed fixes the text whatever else runs"
    );
    assert_eq!(done.usage.expect("usage").completion_tokens, 20);
    let stats = wait_stats(&server, |s| s.completed >= 5).await;
    assert_eq!((stats.running, stats.waiting), (0, 0));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_generation_on_the_worker() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let mut stream = c
        .generate_stream(chat("Tell me a very long story about dragons.", 2000))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first token");
    assert!(matches!(
        first.event,
        Some(pb::generate_stream_response::Event::Token(_))
    ));
    drop(stream);
    drop(c);
    let s = wait_stats(&server, |s| s.cancelled >= 1 && s.running == 0).await;
    assert_eq!(s.cancelled, 1);
    assert_eq!(s.completed, 0);
    assert!(s.generated_tokens < 2000, "generation stopped early: {s:?}");

    // A deadline shorter than the generation also cancels it, with DEADLINE_EXCEEDED to the client.
    let mut c = client(&server.url()).await;
    let mut req = tonic::Request::new(chat("Tell me a very long story about dragons.", 2000));
    req.set_timeout(Duration::from_millis(300));
    let mut stream = c.generate_stream(req).await.unwrap().into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(s) => break s,
        }
    };
    assert!(
        matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
        "{status:?}"
    );
    wait_stats(&server, |s| s.cancelled >= 2 && s.running == 0).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_reports_the_default_and_reflection_lists_services() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].name, "smollm2-135m-instruct");
    assert_eq!(models[0].version, "q4_1");
    assert!(models[0].is_default);
    assert_eq!(models[0].context_length, 8192);
    // Server reflection lists every service, so tools like grpcurl need no proto files.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for wanted in [
        "ferroserve.v1.Inference",
        "ferroserve.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }

    // The same answer on v1alpha, which Postman, grpcui and older grpcurl builds ask for.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let channel = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            replies.message().await.unwrap().unwrap().message_response
        else {
            panic!("expected a v1alpha service list");
        };
        assert!(list.service.iter().any(|s| s.name == "ferroserve.v1.Inference"));
    }

    // Pinning the exact version works.
    let mut req = chat("Hi", 2);
    req.model = "smollm2-135m-instruct@q4_1".into();
    assert!(c.generate(req).await.is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_advertises_a_bounded_stream_limit() {
    let server = start_serve().await;
    // A raw HTTP/2 client reads the server's SETTINGS: streams per connection are bounded (hyper's 200,
    // which tonic would otherwise override with "unlimited").
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let request = http::Request::post(format!("{}/grpc.health.v1.Health/Check", server.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // An empty HealthCheckRequest: the 5-byte gRPC frame header of a zero-length message.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = tokio::time::timeout(WAIT, response).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(send.current_max_send_streams(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_streams() {
    let mut server = start_serve().await;
    let mut c = client(&server.url()).await;
    let mut stream = c
        .generate_stream(chat("Count from one to twenty in words.", 40))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("first token");
    assert!(first.event.is_some());
    server.begin_shutdown();
    let mut complete = None;
    while let Some(msg) = stream.message().await.expect("in-flight stream survives shutdown") {
        if let Some(pb::generate_stream_response::Event::Complete(c)) = msg.event {
            complete = Some(c);
        }
    }
    let complete = complete.expect("in-flight stream completed");
    assert_ne!(complete.finish_reason, pb::FinishReason::Cancelled as i32);
    tokio::time::timeout(WAIT, server.shutdown())
        .await
        .expect("server stopped")
        .unwrap();
}
