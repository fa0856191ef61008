//! The plugin's socket: one thread per connection, each carrying one short request and waiting for
//! the control loop's answer (a request is a few hundred bytes and the answer comes from memory, so
//! a thread is cheaper than an async runtime's machinery for it; see docs/architecture.md).

use crate::control::Event;
use proto::{ErrorKind, Listener, Reply};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Serves `listener` on a thread of its own until the process ends.
pub fn spawn(
    listener: Listener,
    events: mpsc::UnboundedSender<Event>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("plugin-socket".into())
        .spawn(move || accept(listener, events))
}

fn accept(listener: Listener, events: mpsc::UnboundedSender<Event>) {
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
        let _ = std::thread::Builder::new()
            .name("plugin-request".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = proto::serve_one(&stream, |request| {
                    let (reply, answer) = oneshot::channel();
                    if events.send(Event::Plugin { request, reply }).is_err() {
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
