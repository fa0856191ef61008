//! The HTTP listeners: one for EC2's Query API, one per instance for its IMDS.

use crate::config::{Names, ServeConfig};
use crate::ec2;
use crate::imds::{self, Answer, Tokens};
use crate::query::Params;
use crate::xml::Xml;
use ipam::time::Time;
use simvpc::{codes, SimVpc};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tiny_http::{Header, Method, Request, Response};

const EC2_WORKERS: usize = 4;

pub struct Server;

/// An instance as the caller needs it to act as that node.
#[derive(Debug, Clone)]
pub struct InstanceEndpoint {
    pub name: String,
    pub instance_id: String,
    pub imds_url: String,
}

pub struct Running {
    pub ec2_url: String,
    pub instances: Vec<InstanceEndpoint>,
    pub vpc: Arc<Mutex<SimVpc>>,
    pub names: Names,
    servers: Vec<Arc<tiny_http::Server>>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    vpc: Arc<Mutex<SimVpc>>,
    started: Instant,
    latency_scale: f64,
    request_ids: AtomicU64,
}

impl Shared {
    /// EC2's clock: wall time since the server started, so token buckets refill in real time.
    fn now(&self) -> Time {
        Time(self.started.elapsed().as_nanos() as u64)
    }

    fn request_id(&self) -> String {
        let n = self.request_ids.fetch_add(1, Ordering::Relaxed);
        format!("00000000-0000-4000-8000-{n:012x}")
    }
}

impl Server {
    /// Builds the VPC and starts serving EC2 on `listen` and each instance's IMDS on a loopback
    /// port of its own.
    pub fn start(config: &ServeConfig, listen: SocketAddr) -> Result<Running, String> {
        let (vpc, names) = config.build()?;
        let shared = Arc::new(Shared {
            vpc: Arc::new(Mutex::new(vpc)),
            started: Instant::now(),
            latency_scale: config.ec2.latency_scale,
            request_ids: AtomicU64::new(1),
        });
        let ec2_server = Arc::new(
            tiny_http::Server::http(listen).map_err(|e| format!("listening on {listen}: {e}"))?,
        );
        let ec2_url = format!("http://{}", ec2_server.server_addr());
        let mut servers = vec![ec2_server.clone()];
        let mut threads = Vec::new();
        for _ in 0..EC2_WORKERS {
            let server = ec2_server.clone();
            let shared = shared.clone();
            threads.push(std::thread::spawn(move || {
                while let Ok(request) = server.recv() {
                    serve_ec2(&shared, request);
                }
            }));
        }
        let mut instances = Vec::new();
        for (name, instance_id) in &names.instances {
            let server = Arc::new(
                tiny_http::Server::http("127.0.0.1:0")
                    .map_err(|e| format!("IMDS listener: {e}"))?,
            );
            instances.push(InstanceEndpoint {
                name: name.clone(),
                instance_id: instance_id.clone(),
                imds_url: format!("http://{}", server.server_addr()),
            });
            servers.push(server.clone());
            let shared = shared.clone();
            let instance_id = instance_id.clone();
            threads.push(std::thread::spawn(move || {
                let mut tokens = Tokens::default();
                while let Ok(request) = server.recv() {
                    serve_imds(&shared, &instance_id, &mut tokens, request);
                }
            }));
        }
        Ok(Running {
            ec2_url,
            instances,
            vpc: shared.vpc.clone(),
            names,
            servers,
            threads,
        })
    }
}

impl Running {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for server in &self.servers {
            for _ in 0..EC2_WORKERS {
                server.unblock();
            }
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

fn serve_ec2(shared: &Shared, mut request: Request) {
    let mut body = String::new();
    let _ = request.as_reader().read_to_string(&mut body);
    let query = request.url().split_once('?').map(|(_, q)| q).unwrap_or("");
    let params = Params::parse(&format!("{query}&{body}"));
    let request_id = shared.request_id();
    let outcome = match params.get("Action") {
        Some(action) => {
            let action = action.to_string();
            let outcome = {
                let mut vpc = shared.vpc.lock().expect("no panics while holding the VPC");
                ec2::handle(&mut vpc, shared.now(), &action, &params)
            };
            Some((action, outcome))
        }
        None => None,
    };
    let (status, document) = match outcome {
        None => (
            400,
            Xml::error(
                crate::query::MISSING_PARAMETER,
                "The request must contain the parameter Action",
                &request_id,
            ),
        ),
        Some((action, outcome)) => {
            // Latency is served outside the lock, so that slow calls overlap as they do in EC2.
            let latency = outcome.latency.mul_f64(shared.latency_scale);
            if latency > Duration::ZERO {
                std::thread::sleep(latency);
            }
            match outcome.result {
                Ok(body) => (200, Xml::response(&action, &request_id, body)),
                Err(e) => (
                    match e.code {
                        codes::THROTTLED | codes::UNAVAILABLE => 503,
                        codes::TIMEOUT => 500,
                        _ => 400,
                    },
                    Xml::error(e.code, &e.message, &request_id),
                ),
            }
        }
    };
    let response = Response::from_string(document)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/xml;charset=UTF-8"))
        .with_header(header("x-amzn-RequestId", &request_id));
    let _ = request.respond(response);
}

fn serve_imds(shared: &Shared, instance_id: &str, tokens: &mut Tokens, request: Request) {
    let find = |name: &str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str().to_string())
    };
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let answer = match (request.method(), path.as_str()) {
        (Method::Put, "/latest/api/token") => tokens.issue(find(imds::TTL_HEADER).as_deref()),
        (Method::Get, p) if p.starts_with("/latest/") => {
            if tokens.valid(find(imds::TOKEN_HEADER).as_deref()) {
                let vpc = shared.vpc.lock().expect("no panics while holding the VPC");
                imds::metadata(&vpc, instance_id, &p["/latest/".len()..])
            } else {
                Answer::Status(401, "IMDSv2 needs a session token")
            }
        }
        _ => Answer::Status(404, "not found"),
    };
    let response = match answer {
        Answer::Text(text) => Response::from_string(text),
        Answer::Token { token, ttl } => {
            Response::from_string(token).with_header(header(imds::TTL_HEADER, &ttl.to_string()))
        }
        Answer::Status(code, text) => Response::from_string(text).with_status_code(code),
    };
    let _ = request.respond(response.with_header(header("Content-Type", "text/plain")));
}
