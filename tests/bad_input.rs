//! Every kind of bad input gets a clear status naming what to fix, and the server keeps serving.

mod support;

use ferroserve_proto::v1 as pb;
use support::*;
use tonic::Code;

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, mentions: &[&str]) {
    let status = result.expect_err("request should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for m in mentions {
        assert!(
            status.message().contains(m),
            "message {:?} should mention {m:?}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_the_server_keeps_serving() {
    let server = start_serve().await;
    let mut c = client(&server.url()).await;
    let ok = chat("Hi", 4);

    let mut r = ok.clone();
    r.messages.clear();
    assert_status(c.generate(r).await, Code::InvalidArgument, &["prompt", "empty"]);

    let mut r = ok.clone();
    r.prompt = "also a prompt".into();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["prompt", "messages", "exactly one"],
    );

    let mut r = ok.clone();
    r.max_tokens = 0;
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["max_tokens", "at least 1"],
    );

    // Prompt plus max_tokens over the 8192-token context: refused before any work, naming the numbers.
    let mut r = ok.clone();
    r.max_tokens = 8190;
    assert_status(
        c.generate_stream(r).await,
        Code::InvalidArgument,
        &["max_tokens", "8192", "context length"],
    );
    let mut r = ok.clone();
    r.messages[0].content = "word ".repeat(9000);
    assert_status(c.generate(r).await, Code::InvalidArgument, &["context length"]);

    for t in [-1.0, f32::NAN] {
        let mut r = ok.clone();
        r.sampling = Some(pb::SamplingParams {
            temperature: t,
            ..Default::default()
        });
        assert_status(
            c.generate(r).await,
            Code::InvalidArgument,
            &["sampling.temperature", ">= 0"],
        );
    }

    for p in [0.0, 1.01, -0.5] {
        let mut r = ok.clone();
        r.sampling = Some(pb::SamplingParams {
            top_p: Some(p),
            ..Default::default()
        });
        assert_status(
            c.generate(r).await,
            Code::InvalidArgument,
            &["sampling.top_p", "(0, 1]"],
        );
    }

    let mut r = ok.clone();
    r.messages.push(pb::ChatMessage {
        role: "robot".into(),
        content: "beep".into(),
    });
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["messages[1].role", "robot", "system, user, assistant"],
    );

    let mut r = ok.clone();
    r.model = "gpt-17".into();
    assert_status(
        c.generate(r).await,
        Code::NotFound,
        &["gpt-17", "smollm2-135m-instruct@q4_1"],
    );
    let mut r = ok.clone();
    r.model = "smollm2-135m-instruct@v9".into();
    assert_status(c.generate_stream(r).await, Code::NotFound, &["@v9"]);

    // Still serving, on the same connection.
    let answer = c.generate(ok).await.expect("server still serves").into_inner();
    assert_eq!(answer.usage.unwrap().completion_tokens, 4);
    server.shutdown().await.unwrap();
}
