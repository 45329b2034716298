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

    // Structured output: bad constraints are refused before any model work, naming the problem; a good
    // one is obeyed.
    use pb::generate_request::Constraint as C;
    let with = |c: C| {
        let mut r = ok.clone();
        r.constraint = Some(c);
        r
    };
    assert_status(
        c.generate(with(C::Regex("(unclosed".into()))).await,
        Code::InvalidArgument,
        &["regex", "does not compile"],
    );
    assert_status(
        c.generate(with(C::Choice(pb::ChoiceConstraint { choices: vec![] })))
            .await,
        Code::InvalidArgument,
        &["choice.choices", "at least one"],
    );
    assert_status(
        c.generate(with(C::JsonSchema(pb::JsonSchemaConstraint {
            schema: "{\"type\": ".into(),
            strict: true,
        })))
        .await,
        Code::InvalidArgument,
        &["json_schema.schema", "not valid JSON"],
    );
    assert_status(
        c.generate(with(C::Grammar(pb::GrammarConstraint {
            syntax: 0,
            text: "start: \"a\"".into(),
        })))
        .await,
        Code::InvalidArgument,
        &["grammar.syntax", "GRAMMAR_SYNTAX_LARK"],
    );
    assert_status(
        c.generate_stream(with(C::Grammar(pb::GrammarConstraint {
            syntax: pb::GrammarSyntax::Gbnf as i32,
            text: "root ::= nowhere".into(),
        })))
        .await,
        Code::InvalidArgument,
        &["grammar", "never defined"],
    );
    let mut r = with(C::JsonSchema(pb::JsonSchemaConstraint {
        schema: r#"{"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
                    "required": ["colour"], "additionalProperties": false}"#
            .into(),
        strict: true,
    }));
    r.max_tokens = 32;
    let answer = c.generate(r).await.expect("a constrained request").into_inner();
    let value: serde_json::Value = serde_json::from_str(&answer.text).expect("the output is JSON");
    assert!(
        ["red", "green", "blue"].contains(&value["colour"].as_str().unwrap_or("")),
        "{value}"
    );

    // Still serving, on the same connection.
    let answer = c.generate(ok).await.expect("server still serves").into_inner();
    assert_eq!(answer.usage.unwrap().completion_tokens, 4);
    server.shutdown().await.unwrap();
}

/// Health checks back to back until `stop`, each bounded; returns how many answered SERVING and the
/// slowest one. A server whose runtime is starved by hostile input would miss the bound.
async fn probe_health(url: String, stop: tokio::sync::watch::Receiver<bool>) -> (u32, std::time::Duration) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(
        tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let (mut served, mut slowest) = (0, std::time::Duration::ZERO);
    while !*stop.borrow() {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            health.check(HealthCheckRequest { service: String::new() }),
        )
        .await
        .expect("health answered within 10 s during hostile input")
        .expect("health check");
        assert_eq!(answer.into_inner().status, 1, "SERVING");
        served += 1;
        slowest = slowest.max(started.elapsed());
        tokio::task::yield_now().await;
    }
    (served, slowest)
}

fn with_deadline<T>(message: T, secs: u64) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(std::time::Duration::from_secs(secs));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_limit_is_refused_by_name_while_health_stays_responsive() {
    let server = start_serve().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probe = tokio::spawn(probe_health(server.url(), stopped));
    let mut c = client(&server.url()).await;
    let ok = chat("Hi", 4);
    let msg = |content: &str| pb::ChatMessage {
        role: "user".into(),
        content: content.into(),
    };

    // A request that can never fit the context is invalid, even with a deadline admission would shed for.
    let mut r = ok.clone();
    r.max_tokens = 10_000_000;
    assert_status(
        c.generate(with_deadline(r, 30)).await,
        Code::InvalidArgument,
        &["max_tokens", "context length"],
    );
    let r = pb::GenerateRequest {
        prompt: "x".repeat(256 * 1024 + 1),
        max_tokens: 1,
        ..Default::default()
    };
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["prompt", "max_prompt_bytes"],
    );
    let mut r = ok.clone();
    r.messages = (0..513).map(|_| msg("")).collect();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["messages", "max_messages", "513"],
    );
    let mut r = ok.clone();
    r.messages = (0..3).map(|_| msg(&"y".repeat(100 * 1024))).collect();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["messages", "max_prompt_bytes"],
    );
    // Over max_request_bytes (1 MiB): refused before it is decoded, as the client's mistake.
    let mut r = ok.clone();
    r.messages = (0..600 * 1024).map(|_| msg("")).collect();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["request", "max_request_bytes is 1048576"],
    );
    let mut r = ok.clone();
    r.model = "m".repeat(129);
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["model", "max_model_bytes"],
    );
    let mut r = ok.clone();
    r.session = "s".repeat(257);
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["session", "max_session_bytes"],
    );
    let mut r = ok.clone();
    r.session = "user\nforged".into();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["session", "control character"],
    );
    let mut r = ok.clone();
    r.request_id = "r".repeat(129);
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["request_id", "max_request_id_bytes"],
    );
    let mut r = ok.clone();
    r.request_id = "req-1\nlevel=error msg=forged".into();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["request_id", "ASCII letters"],
    );
    let mut r = ok.clone();
    r.stop = (0..17).map(|i| format!("s{i}")).collect();
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["stop", "max_stop_sequences"],
    );
    let mut r = ok.clone();
    r.stop = vec!["z".repeat(257)];
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["stop[0]", "max_stop_bytes"],
    );
    let mut r = ok.clone();
    r.sampling = Some(pb::SamplingParams {
        temperature: 101.0,
        ..Default::default()
    });
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["sampling.temperature", "100"],
    );
    let mut r = ok.clone();
    r.sampling = Some(pb::SamplingParams {
        temperature: 1.0,
        repetition_penalty: Some(f32::INFINITY),
        ..Default::default()
    });
    assert_status(
        c.generate(r).await,
        Code::InvalidArgument,
        &["sampling.repetition_penalty"],
    );
    // A huge unknown role is named, but not echoed whole.
    let mut r = ok.clone();
    r.messages[0].role = "r".repeat(10_000);
    let status = c.generate(r).await.expect_err("unknown role");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 300, "{} bytes echoed", status.message().len());

    // A subnormal temperature is greedy, not NaN: the same text as temperature 0.
    let greedy = c.generate(ok.clone()).await.unwrap().into_inner();
    let mut r = ok.clone();
    r.sampling = Some(pb::SamplingParams {
        temperature: 1e-40,
        ..Default::default()
    });
    assert_eq!(c.generate(r).await.unwrap().into_inner().text, greedy.text);

    stop.send(true).unwrap();
    let (served, slowest) = probe.await.unwrap();
    assert!(served > 0, "the health probe ran");
    println!("health: {served} checks answered during the table, slowest {slowest:?}");
    let answer = c.generate(ok).await.expect("still serving").into_inner();
    assert_eq!(answer.usage.unwrap().completion_tokens, 4);
    server.shutdown().await.unwrap();
}
