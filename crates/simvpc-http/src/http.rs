//! A minimal HTTP/1.1 server: a thread per connection, keep-alive, `Content-Length` bodies. Enough
//! for the SDKs' EC2 and IMDS clients on loopback, and predictable (a general-purpose server crate
//! left kept-alive connections unanswered until the SDK's 90 s pool timeout).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// A request's line and headers, as `httparse` reads them.
pub struct Head {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// HTTP/1.1 rather than 1.0: kept alive unless the client says otherwise.
    pub http11: bool,
    pub headers: Vec<(String, String)>,
}

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a request head.
const MAX_HEADERS: usize = 64;

/// Reads one request head (up to its blank line) and parses it with `httparse`. `None`: the client
/// closed the connection before sending anything; `InvalidData`: not an HTTP/1.x request head.
pub fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut bytes = Vec::with_capacity(512);
    loop {
        let start = bytes.len();
        if reader.read_until(b'\n', &mut bytes)? == 0 {
            if bytes.is_empty() {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = &bytes[start..];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if bytes.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "incomplete request head",
            ))
        }
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
    }
    Ok(Some(Head {
        method: request.method.unwrap_or_default().to_string(),
        target: request.path.unwrap_or_default().to_string(),
        http11: request.version == Some(1),
        headers: request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect(),
    }))
}

pub struct HttpServer {
    pub address: SocketAddr,
    /// The listening socket, shut down to wake the accept loop: connecting to it would not work when
    /// it listens in another network namespace.
    listener_fd: RawFd,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// Largest request body accepted; EC2 requests are a few kilobytes.
const MAX_BODY: usize = 1 << 20;
/// An idle kept-alive connection is closed after this.
const IDLE: Duration = Duration::from_secs(60);

impl HttpServer {
    pub fn start(listen: SocketAddr, handler: Handler) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(listen)?;
        let address = listener.local_addr()?;
        let listener_fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let handler = handler.clone();
                    std::thread::spawn(move || {
                        let _ = serve_connection(stream, &handler);
                    });
                }
            })
        };
        Ok(HttpServer {
            address,
            listener_fd,
            stop,
            accept: Some(accept),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.stop.store(true, Ordering::SeqCst);
            // SAFETY: the accept thread owns the listener and is still running (it is joined just
            // below), so the descriptor is open; shutdown only makes its accept() fail.
            unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
            let _ = accept.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_connection(stream: TcpStream, handler: &Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return write_response(&mut writer, &Response::new(400, e.to_string()), false)
            }
            Err(e) => return Err(e),
        };
        let Head {
            method,
            target,
            http11,
            headers,
        } = head;
        let mut keep_alive = http11;
        let request_header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if let Some(connection) = request_header("Connection") {
            keep_alive = !connection.eq_ignore_ascii_case("close");
        }
        let length: usize = request_header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if length > MAX_BODY {
            return write_response(&mut writer, &Response::new(413, "body too large"), false);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let response = handler(Request {
            method,
            target,
            headers,
            body,
        });
        write_response(&mut writer, &response, keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

fn write_response(out: &mut TcpStream, response: &Response, keep_alive: bool) -> io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: {}\r\n\r\n",
        response.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    ));
    // One write: a head and a body sent apart wait out the client's delayed ACK (40 ms) under Nagle.
    let mut message = head.into_bytes();
    message.extend_from_slice(response.body.as_bytes());
    out.write_all(&message)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_by_httparse_and_garbage_is_refused() {
        let mut input: &[u8] =
            b"POST /?Action=X HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET";
        let head = read_head(&mut input).unwrap().unwrap();
        assert_eq!(
            (head.method.as_str(), head.target.as_str()),
            ("POST", "/?Action=X")
        );
        assert!(head.http11);
        assert_eq!(head.headers[1], ("Content-Length".into(), "3".into()));
        assert_eq!(input, b"abcGET", "the body is left to read");

        let mut old: &[u8] = b"GET / HTTP/1.0\n\n";
        assert!(!read_head(&mut old).unwrap().unwrap().http11);
        let mut nothing: &[u8] = b"";
        assert!(read_head(&mut nothing).unwrap().is_none());
        let mut garbage: &[u8] = b"\x01\x02 nonsense\r\n\r\n";
        let e = read_head(&mut garbage).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut cut: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n";
        assert!(read_head(&mut cut).is_err(), "a head that ends early");
    }
}
