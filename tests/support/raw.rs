//! Calling any gRPC method by path with raw bytes, for tests that walk every RPC of the descriptor set.

use bytes::{Buf, BufMut};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Sends and receives message bytes as they are: an empty message is the default of any message type.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// Encodes raw bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

/// Decodes raw bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// How a method streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One message each way.
    Unary,
    /// One request, a stream back.
    ServerStreaming,
    /// A stream of requests (possibly a stream back too).
    ClientStreaming,
}

/// One RPC of a service, from the descriptor set.
#[derive(Debug, Clone)]
pub struct Method {
    /// `/package.Service/Method`.
    pub path: String,
    /// `package.Service`.
    pub service: String,
    /// How it streams.
    pub kind: Kind,
}

/// Every method of every service in these encoded descriptor sets.
pub fn methods(sets: &[&[u8]]) -> Vec<Method> {
    use prost::Message;
    let mut out = Vec::new();
    for set in sets {
        let set = prost_types::FileDescriptorSet::decode(*set).expect("a valid descriptor set");
        for file in set.file {
            for service in &file.service {
                let name = format!("{}.{}", file.package(), service.name());
                for m in &service.method {
                    let kind = match (m.client_streaming(), m.server_streaming()) {
                        (false, false) => Kind::Unary,
                        (false, true) => Kind::ServerStreaming,
                        (true, _) => Kind::ClientStreaming,
                    };
                    out.push(Method {
                        path: format!("/{name}/{}", m.name()),
                        service: name.clone(),
                        kind,
                    });
                }
            }
        }
    }
    out
}

/// Calls `method` with `body` (empty: the default message) and `authorization`, and returns the status:
/// OK once a stream has started, or the call's error code.
pub async fn call(channel: Channel, method: &Method, body: Vec<u8>, authorization: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {e}");
    }
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(method.path.as_str()).expect("a path");
    fn with_auth<T>(mut r: tonic::Request<T>, authorization: Option<&str>) -> tonic::Request<T> {
        if let Some(a) = authorization {
            r.metadata_mut()
                .insert("authorization", a.parse().expect("header text"));
        }
        r
    }
    let result = match method.kind {
        Kind::Unary => grpc
            .unary(with_auth(tonic::Request::new(body), authorization), path, RawCodec)
            .await
            .map(|_| ()),
        Kind::ServerStreaming => grpc
            .server_streaming(with_auth(tonic::Request::new(body), authorization), path, RawCodec)
            .await
            .map(|_| ()),
        Kind::ClientStreaming => {
            let requests = futures::stream::iter([body]);
            grpc.streaming(with_auth(tonic::Request::new(requests), authorization), path, RawCodec)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}
