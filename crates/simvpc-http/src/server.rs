//! The HTTP listeners: one for EC2's Query API, one per instance for its IMDS.

use crate::config::{Names, ServeConfig};
use crate::ec2;
use crate::http::{HttpServer, Request, Response};
use crate::imds::{self, Answer, Tokens};
use crate::query::Params;
use crate::xml::Xml;
use ipam::time::Time;
use simvpc::{codes, SimVpc};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server;

/// Called with the VPC after every EC2 call that changed it, before the reply is sent (so a caller
/// that hot-plugs links for attached ENIs has them in place when the attach returns, as EC2's do).
pub type Observer = Arc<dyn Fn(&SimVpc) + Send + Sync>;

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
    servers: Vec<HttpServer>,
}

struct Shared {
    vpc: Arc<Mutex<SimVpc>>,
    started: Instant,
    latency_scale: f64,
    request_ids: AtomicU64,
    observer: Option<Observer>,
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
    /// Builds the VPC and starts serving EC2 on `listen` and each instance's IMDS on a port of its
    /// own at the same address.
    pub fn start(config: &ServeConfig, listen: SocketAddr) -> Result<Running, String> {
        Self::start_observed(config, listen, None)
    }

    pub fn start_observed(
        config: &ServeConfig,
        listen: SocketAddr,
        observer: Option<Observer>,
    ) -> Result<Running, String> {
        let (vpc, names) = config.build()?;
        let shared = Arc::new(Shared {
            vpc: Arc::new(Mutex::new(vpc)),
            started: Instant::now(),
            latency_scale: config.ec2.latency_scale,
            request_ids: AtomicU64::new(1),
            observer,
        });
        let ec2_server = {
            let shared = shared.clone();
            HttpServer::start(listen, Arc::new(move |request| serve_ec2(&shared, request)))
                .map_err(|e| format!("listening on {listen}: {e}"))?
        };
        let ec2_url = ec2_server.url();
        let mut servers = vec![ec2_server];
        let mut instances = Vec::new();
        for (name, instance_id) in &names.instances {
            let shared = shared.clone();
            let id = instance_id.clone();
            let tokens = Mutex::new(Tokens::default());
            let server = HttpServer::start(
                SocketAddr::new(listen.ip(), 0),
                Arc::new(move |request| serve_imds(&shared, &id, &tokens, request)),
            )
            .map_err(|e| format!("IMDS listener: {e}"))?;
            instances.push(InstanceEndpoint {
                name: name.clone(),
                instance_id: instance_id.clone(),
                imds_url: server.url(),
            });
            servers.push(server);
        }
        Ok(Running {
            ec2_url,
            instances,
            vpc: shared.vpc.clone(),
            names,
            servers,
        })
    }
}

impl Running {
    pub fn stop(mut self) {
        for server in &mut self.servers {
            server.stop();
        }
    }
}

fn serve_ec2(shared: &Shared, request: Request) -> Response {
    let body = String::from_utf8_lossy(&request.body);
    let query = request.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let params = Params::parse(&format!("{query}&{body}"));
    let request_id = shared.request_id();
    let (status, document) = match params.get("Action") {
        None => (
            400,
            Xml::error(
                crate::query::MISSING_PARAMETER,
                "The request must contain the parameter Action",
                &request_id,
            ),
        ),
        Some(action) => {
            let outcome = {
                let mut vpc = shared.vpc.lock().expect("no panics while holding the VPC");
                let outcome = ec2::handle(&mut vpc, shared.now(), action, &params);
                if let (Some(observe), Ok(_)) = (&shared.observer, &outcome.result) {
                    if !action.starts_with("Describe") {
                        observe(&vpc);
                    }
                }
                outcome
            };
            // Latency is served outside the lock, so that slow calls overlap as they do in EC2.
            let latency = outcome.latency.mul_f64(shared.latency_scale);
            if latency > Duration::ZERO {
                std::thread::sleep(latency);
            }
            match outcome.result {
                Ok(body) => (200, Xml::response(action, &request_id, body)),
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
    Response::new(status, document)
        .with_header("Content-Type", "text/xml;charset=UTF-8")
        .with_header("x-amzn-RequestId", &request_id)
}

fn serve_imds(
    shared: &Shared,
    instance_id: &str,
    tokens: &Mutex<Tokens>,
    request: Request,
) -> Response {
    let path = request.target.split('?').next().unwrap_or("");
    let answer = match (request.method.as_str(), path) {
        ("PUT", "/latest/api/token") => tokens
            .lock()
            .expect("token lock")
            .issue(request.header(imds::TTL_HEADER)),
        ("GET", p) if p.starts_with("/latest/") => {
            if tokens
                .lock()
                .expect("token lock")
                .valid(request.header(imds::TOKEN_HEADER))
            {
                let vpc = shared.vpc.lock().expect("no panics while holding the VPC");
                imds::metadata(&vpc, instance_id, &p["/latest/".len()..])
            } else {
                Answer::Status(401, "IMDSv2 needs a session token")
            }
        }
        _ => Answer::Status(404, "not found"),
    };
    let response = match answer {
        Answer::Text(text) => Response::new(200, text),
        Answer::Token { token, ttl } => {
            Response::new(200, token).with_header(imds::TTL_HEADER, &ttl.to_string())
        }
        Answer::Status(code, text) => Response::new(code, text),
    };
    response.with_header("Content-Type", "text/plain")
}
