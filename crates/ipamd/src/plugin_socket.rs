//! The plugin's socket: one thread per connection, each carrying one short request and waiting for
//! the control loop's answer (a request is a few hundred bytes and the answer comes from memory, so
//! a thread is cheaper than an async runtime's machinery for it; see docs/architecture.md).

use crate::branches::PodEniMode;
use crate::control::Event;
use proto::{ErrorKind, Listener, Reply, Request};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Serves `listener` on a thread of its own until the process ends. With `branches` (security
/// groups for pods), a branch pod's ADD and DEL are answered here (EKS's controller), or its
/// groups read here for the control loop (the node's own branches), on the caller's runtime.
pub fn spawn(
    listener: Listener,
    events: mpsc::UnboundedSender<Event>,
    branches: Option<PodEniMode>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let branches = branches.map(|b| (Arc::new(b), tokio::runtime::Handle::current()));
    std::thread::Builder::new()
        .name("plugin-socket".into())
        .spawn(move || accept(listener, events, branches))
}

fn accept(
    listener: Listener,
    events: mpsc::UnboundedSender<Event>,
    branches: Option<(Arc<PodEniMode>, tokio::runtime::Handle)>,
) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "plugin socket accept");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let events = events.clone();
        let branches = branches.clone();
        let _ = std::thread::Builder::new()
            .name("plugin-request".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = proto::serve_one(&stream, |request| {
                    let mut groups = None;
                    if let Some((mode, runtime)) = &branches {
                        // On the runtime's threads: this one's stack is small, and reading the
                        // pod takes the Kubernetes client's.
                        let (mode, asked) = (mode.clone(), request.clone());
                        let (tx, answer) = oneshot::channel();
                        runtime.spawn(async move {
                            let _ = tx.send(route(&mode, &asked).await);
                        });
                        match answer.blocking_recv() {
                            Ok(Route::Reply(reply)) => {
                                return through_loop(&events, &request, reply)
                            }
                            Ok(Route::Branch(g)) => groups = Some(g),
                            Ok(Route::Pool) => {}
                            // Not an address of the pool for a pod that may want a branch.
                            Err(_) => {
                                return Reply::Error {
                                    kind: ErrorKind::Unavailable,
                                    message: "the pod's branch ENI could not be looked up".into(),
                                }
                            }
                        }
                    }
                    let (reply, answer) = oneshot::channel();
                    if events
                        .send(Event::Plugin {
                            request,
                            reply,
                            groups,
                        })
                        .is_err()
                    {
                        return Reply::Error {
                            kind: ErrorKind::Unavailable,
                            message: "vpc-ipamd is stopping".into(),
                        };
                    }
                    answer.blocking_recv().unwrap_or(Reply::Error {
                        kind: ErrorKind::Unavailable,
                        message: "vpc-ipamd is stopping".into(),
                    })
                });
            });
    }
}

/// On EKS a branch pod's ADD answer goes through the control loop, which tells NetworkPolicy of the
/// pod and sends the answer once its rules are in; any other answer comes straight back.
fn through_loop(events: &mpsc::UnboundedSender<Event>, request: &Request, reply: Reply) -> Reply {
    let (Request::Add { pod, .. }, Reply::Added { allocation }) = (request, &reply) else {
        return reply;
    };
    if allocation.branch.is_none() {
        return reply;
    }
    let (tx, answer) = oneshot::channel();
    let event = Event::ControllerBranchAdded {
        pod: k8s::PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
        },
        ip: allocation.address,
        reply: tx,
        message: reply.clone(),
    };
    if events.send(event).is_err() {
        return reply;
    }
    answer.blocking_recv().unwrap_or(reply)
}

/// Where a request goes with security groups for pods on.
enum Route {
    /// Answered here (EKS: the controller's annotation; or an error reading the pod).
    Reply(Reply),
    /// To the control loop, for a branch with these groups.
    Branch(ipam::branches::GroupSet),
    /// To the control loop, as any request.
    Pool,
}

async fn route(mode: &PodEniMode, request: &Request) -> Route {
    match mode {
        PodEniMode::Controller(branches) => match branches.answer(request).await {
            Some(reply) => Route::Reply(reply),
            None => Route::Pool,
        },
        PodEniMode::Node(source) => {
            let Request::Add { pod, .. } = request else {
                return Route::Pool;
            };
            match source.pod_groups(&pod.namespace, &pod.name).await {
                Ok(groups) if groups.is_empty() => Route::Pool,
                Ok(groups) => Route::Branch(ipam::branches::GroupSet::new(groups)),
                Err(e) => Route::Reply(Reply::Error {
                    kind: ErrorKind::Unavailable,
                    message: e.to_string(),
                }),
            }
        }
    }
}
