//! The local HTTP endpoint of the daemon: `GET /metrics` (Prometheus text) and
//! `GET /healthz` (200 while the receive loop is alive, 503 when it has not shown life for
//! a while). `HEAD` answers the same headers without the body; a query string is ignored
//! (scrapers and probes add their own). A deliberately tiny HTTP/1.1 responder: one request
//! per connection, bounded read size and time. What the numbers are is `metrics.rs`.
//!
//! Not hyper, though the SDK brings it: the SDK builds it as a client only, and its server
//! feature would rebuild hyper and every SDK crate above it, for a loopback endpoint whose
//! only parsing is one request line (no bodies, no keep-alive, no chunking to get right).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Registry;

const MAX_REQUEST: usize = 8192;
/// The Prometheus text exposition format, version 0.0.4, which is UTF-8.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, stats: Arc<Registry>, alive_within: Duration) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, answer(conn, &stats, alive_within)).await;
        });
    }
}

async fn answer(
    mut conn: TcpStream,
    stats: &Registry,
    alive_within: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split(['?', '#']).next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", METRICS_CONTENT_TYPE, stats.prometheus()),
        ("GET" | "HEAD", "/healthz") if stats.loop_is_alive(alive_within) => {
            ("200 OK", TEXT, "ok\n".to_string())
        }
        ("GET" | "HEAD", "/healthz") => (
            "503 Service Unavailable",
            TEXT,
            format!(
                "the receive loop has not polled the queue within {}s\n",
                alive_within.as_secs()
            ),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            TEXT,
            "try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            TEXT,
            "GET or HEAD only\n".to_string(),
        ),
    };
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    // HEAD: the headers GET would send, Content-Length included, and no body.
    let sent = if method == "HEAD" { "" } else { body.as_str() };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{sent}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves a fresh `Stats` on a free port of 127.0.0.1; the task ends with the test's
    /// runtime.
    async fn endpoint() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            Duration::from_secs(60),
        ));
        addr
    }

    /// Sends `request_line` and returns (status line, headers lowercased by name, body).
    async fn request(
        addr: std::net::SocketAddr,
        request_line: &str,
    ) -> (String, Vec<(String, String)>, String) {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(format!("{request_line}\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut raw))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        (status, headers, body.to_string())
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_0_0_4_in_utf_8() {
        let addr = endpoint().await;
        let (status, headers, body) = request(addr, "GET /metrics HTTP/1.1").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            header(&headers, "content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert_eq!(
            header(&headers, "content-length"),
            Some(body.len().to_string().as_str())
        );
        assert!(body.contains("# TYPE provision_in_flight gauge"), "{body}");
    }

    #[tokio::test]
    async fn a_query_string_is_ignored() {
        let addr = endpoint().await;
        let (_, _, plain) = request(addr, "GET /metrics HTTP/1.1").await;
        let (status, headers, body) = request(addr, "GET /metrics?x=1&name[]=a HTTP/1.1").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(header(&headers, "content-type"), Some(METRICS_CONTENT_TYPE));
        assert_eq!(body, plain);
        // /healthz too (load balancers add cache busters); the loop has not polled yet.
        let (status, _, body) = request(addr, "GET /healthz?probe=lb HTTP/1.1").await;
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert!(
            body.starts_with("the receive loop has not polled"),
            "{body}"
        );
        assert_eq!(
            request(addr, "GET /nope?x=1 HTTP/1.1").await.0,
            "HTTP/1.1 404 Not Found"
        );
    }

    #[tokio::test]
    async fn head_answers_the_headers_of_get_without_a_body() {
        let addr = endpoint().await;
        let (_, get_headers, get_body) = request(addr, "GET /metrics HTTP/1.1").await;
        let (status, headers, body) = request(addr, "HEAD /metrics HTTP/1.1").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "", "HEAD sends no body");
        assert_eq!(headers, get_headers);
        assert_eq!(
            header(&headers, "content-length"),
            Some(get_body.len().to_string().as_str())
        );
        let (status, _, body) = request(addr, "HEAD /healthz?x HTTP/1.1").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 503 Service Unavailable", "")
        );
    }

    #[tokio::test]
    async fn other_methods_are_refused_naming_the_allowed_ones() {
        let addr = endpoint().await;
        let (status, headers, _) = request(addr, "POST /metrics HTTP/1.1").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
    }
}
