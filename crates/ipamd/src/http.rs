//! The daemon's GET endpoints (introspection, metrics, probes) on hyper's HTTP/1.1 server, which the
//! daemon links already for its clients (the AWS SDK, kube-rs): one request per connection, 8 KiB of
//! headers at most, 5 s to send them, as upstream's servers.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(value: &serde_json::Value) -> Response {
        Response {
            status: 200,
            content_type: "application/json",
            body: value.to_string(),
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

pub type Routes =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// hyper's smallest read buffer, which bounds the request head.
const MAX_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, routes: Routes) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, routes.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, connection).await;
        });
    }
}

async fn respond(
    request: hyper::Request<Incoming>,
    routes: Routes,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let response = if request.method() == Method::GET {
        routes(request.uri().path().to_string()).await
    } else {
        Response::text(405, "only GET is served")
    };
    let mut reply = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *reply.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = reply.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        response.content_type.parse().expect("a valid header"),
    );
    headers.insert(CONNECTION, "close".parse().expect("a valid header"));
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let routes: Routes = Arc::new(|path: String| {
            Box::pin(async move {
                match path.as_str() {
                    "/v1/enis" => Response::json(&serde_json::json!({"enis": 1})),
                    _ => Response::text(404, "not found"),
                }
            })
        });
        tokio::spawn(serve(listener, routes));
        address
    }

    /// The raw answer to `request`, from a plain blocking client.
    async fn raw(address: std::net::SocketAddr, request: Vec<u8>) -> String {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            stream.write_all(&request).unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn gets_are_routed_and_everything_else_refused() {
        let address = server().await;
        let (status, body) =
            tokio::task::spawn_blocking(move || proto::http_get(address, "/v1/enis?x=1"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!((status, body.as_str()), (200, r#"{"enis":1}"#));
        let answer = raw(address, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        let answer = raw(
            address,
            b"POST /v1/enis HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        let mut huge = b"GET /v1/enis HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 3 * MAX_HEAD));
        huge.extend_from_slice(b"\r\n\r\n");
        let answer = raw(address, huge).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }
}
