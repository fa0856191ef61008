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
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return write_response(&mut writer, &Response::new(400, "bad request line"), false);
        };
        let (method, target) = (method.to_string(), target.to_string());
        let mut keep_alive = version == "HTTP/1.1";
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
        }
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
