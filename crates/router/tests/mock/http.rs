//! A minimal HTTP/1.1 client for the router's HTTP door: one request per connection, the response read
//! whole (chunked bodies decoded), or the connection kept open to read a stream and then drop it.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::WAIT;

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream, in order.
    pub fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn request(url: &str, method: &str, path: &str, key: Option<&str>, body: &str) -> (String, Vec<u8>) {
    request_with(url, method, path, key, &[], body)
}

fn request_with(
    url: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> (String, Vec<u8>) {
    let addr = url.trim_start_matches("http://").to_string();
    let mut extra = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    for (name, value) in headers {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    (addr, bytes)
}

/// Status line and headers.
async fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            return (status, headers);
        }
        let (n, v) = l.split_once(':').expect("header");
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
}

/// Connects to `addr`, sends `bytes`, and reads the response's status line and headers; the body is left
/// in the reader.
async fn exchange(addr: String, bytes: &[u8]) -> (BufReader<TcpStream>, u16, Vec<(String, String)>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader).await;
    (reader, status, headers)
}

/// Sends one request and reads the whole response (bounded).
pub async fn send(url: &str, method: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
    send_with(url, method, path, key, &[], body).await
}

/// [`send`] with extra request headers.
pub async fn send_with(
    url: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    tokio::time::timeout(WAIT, async {
        let (addr, bytes) = request_with(url, method, path, key, headers, body);
        let (mut reader, status, headers) = exchange(addr, &bytes).await;
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let mut raw = Vec::new();
        match length {
            Some(n) if !chunked => {
                raw.resize(n, 0);
                reader.read_exact(&mut raw).await.unwrap();
            }
            _ => {
                reader.read_to_end(&mut raw).await.unwrap();
            }
        }
        let body = if chunked { dechunk(&raw) } else { raw };
        Reply {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    })
    .await
    .expect("response in time")
}

/// Sends only the head of a request whose `Content-Length` claims `len` bytes, and reads the answer.
pub async fn claim(url: &str, path: &str, key: Option<&str>, len: usize) -> Reply {
    tokio::time::timeout(WAIT, async {
        let (addr, mut bytes) = request(url, "POST", path, key, "");
        let head = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("Content-Length: 0", &format!("Content-Length: {len}"));
        bytes = head.into_bytes();
        let (_, status, headers) = exchange(addr, &bytes).await;
        Reply {
            status,
            headers,
            body: String::new(),
        }
    })
    .await
    .expect("response in time")
}

pub async fn post(url: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
    send(url, "POST", path, key, body).await
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 4 + size..];
    }
}

/// Opens a streaming request and returns once its first `data:` line has arrived; dropping the returned
/// reader closes the connection (the client leaving mid-stream).
pub async fn open_stream(url: &str, path: &str, key: Option<&str>, body: &str) -> BufReader<TcpStream> {
    tokio::time::timeout(WAIT, async {
        let (addr, bytes) = request(url, "POST", path, key, body);
        let (mut reader, status, _) = exchange(addr, &bytes).await;
        assert_eq!(status, 200);
        let mut line = String::new();
        while !line.contains("data: ") {
            line.clear();
            assert!(reader.read_line(&mut line).await.unwrap() > 0, "stream ended early");
        }
        reader
    })
    .await
    .expect("first event in time")
}
