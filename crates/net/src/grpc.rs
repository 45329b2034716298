//! What every gRPC server of Ferroserve has: reflection in both protocol versions, an oversized request
//! answered as the client's mistake, and a drain with a deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use tower_layer::Layer;
use tower_service::Service;

/// gRPC server reflection over Ferroserve's and the health service's descriptors, as `v1` (grpcurl,
/// current clients) and `v1alpha` (Postman, grpcui and older grpcurl builds ask only for this).
pub fn reflection_services() -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferroserve_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    (
        builder().build_v1().expect("the compiled-in descriptor sets are valid"),
        builder()
            .build_v1alpha()
            .expect("the compiled-in descriptor sets are valid"),
    )
}

/// tonic refuses a request message over `max_decoding_message_size` before reading it, but with
/// OUT_OF_RANGE and its own wording. This layer turns that answer into INVALID_ARGUMENT naming the limit,
/// as every other request limit is answered, and says what to do.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeIsInvalid;

impl<S> Layer<S> for OversizeIsInvalid {
    type Service = OversizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeService { inner }
    }
}

/// The service [`OversizeIsInvalid`] wraps.
#[derive(Debug, Clone)]
pub struct OversizeService<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for OversizeService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_oversize(response.headers_mut());
            Ok(response)
        })
    }
}

/// gRPC code OUT_OF_RANGE, as tonic sends it for an oversized message.
const OUT_OF_RANGE: &str = "11";
/// gRPC code INVALID_ARGUMENT.
const INVALID_ARGUMENT: &str = "3";

/// Rewrites a trailers-only "decoded message length too large" status in `headers`.
fn rewrite_oversize(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").and_then(|v| v.to_str().ok()) != Some(OUT_OF_RANGE) {
        return;
    }
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
    else {
        return;
    };
    if !message.contains("decoded message length too large") {
        return;
    }
    // "...found {len} bytes, the limit is: {limit} bytes": the two numbers, digits never being escaped.
    let numbers: Vec<&str> = message
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .collect();
    let (found, limit) = match numbers.as_slice() {
        [found, limit, ..] => (*found, *limit),
        _ => ("more", "the configured number of"),
    };
    let text = format!(
        "request: the message is {found} bytes; the limit max_request_bytes is {limit} bytes; send a shorter \
         input or raise router.max_request_bytes"
    );
    headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    if let Ok(v) = HeaderValue::from_str(&text) {
        headers.insert("grpc-message", v);
    }
}

/// `%XX` escapes (as the gRPC spec writes `grpc-message`) back to their characters.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_oversized_request_is_rewritten() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%205000%20bytes,%20the%20limit%20is:%201024%20bytes",
            ),
        );
        rewrite_oversize(&mut h);
        assert_eq!(h["grpc-status"], "3");
        let m = h["grpc-message"].to_str().unwrap();
        assert!(
            m.contains("5000 bytes") && m.contains("max_request_bytes is 1024"),
            "{m}"
        );
        let mut other = http::HeaderMap::new();
        other.insert("grpc-status", HeaderValue::from_static("11"));
        other.insert("grpc-message", HeaderValue::from_static("seek past the end"));
        rewrite_oversize(&mut other);
        assert_eq!(other["grpc-status"], "11");
    }
}
