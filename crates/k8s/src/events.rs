//! Warning Events about the daemon's own pod (`kube-system/$MY_POD_NAME`), as upstream sends
//! them (`MissingIAMPermissions`, ...), so that `kubectl describe pod` and event exporters show
//! why a node gets no addresses.

use crate::Cluster;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::PostParams;
use kube::Api;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const NAMESPACE: &str = "kube-system";
/// The same reason and message are not sent again within this window: a failing EC2 call is
/// retried every few seconds, and one Event says it as well as a hundred.
pub const REPEAT_AFTER: Duration = Duration::from_secs(600);
const COMPONENT: &str = "vpc-ipamd";

/// A handle that queues Warning Events; sending never waits for the API server.
#[derive(Clone)]
pub struct Reporter {
    queue: Option<mpsc::UnboundedSender<(String, String)>>,
}

impl Reporter {
    /// Standalone: Events go nowhere.
    pub fn disabled() -> Reporter {
        Reporter { queue: None }
    }

    pub fn warning(&self, reason: &str, message: &str) {
        if let Some(queue) = &self.queue {
            let _ = queue.send((reason.to_string(), message.to_string()));
        }
    }
}

impl Cluster {
    /// A reporter whose Events a task of its own creates; `on_error` hears of those the API
    /// server refused. Without `MY_POD_NAME` there is nothing to attach Events to.
    pub fn reporter(&self, on_error: impl Fn(String) + Send + 'static) -> Reporter {
        let Some(pod) = self.settings.own_pod.clone() else {
            return Reporter::disabled();
        };
        let (queue, mut received) = mpsc::unbounded_channel::<(String, String)>();
        let events: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let node = self.settings.node_name.clone();
        tokio::spawn(async move {
            let mut sent: HashMap<(String, String), Instant> = HashMap::new();
            while let Some((reason, message)) = received.recv().await {
                let key = (reason.clone(), message.clone());
                if sent.get(&key).is_some_and(|at| at.elapsed() < REPEAT_AFTER) {
                    continue;
                }
                sent.insert(key, Instant::now());
                let event = warning_event(&pod, &node, &reason, &message);
                if let Err(e) = events.create(&PostParams::default(), &event).await {
                    on_error(format!("creating the Event {reason}: {e}"));
                }
            }
        });
        Reporter { queue: Some(queue) }
    }
}

impl Cluster {
    /// One Warning Event, sent before this returns: for a daemon about to exit (start-up failed),
    /// whose queued Events would die with it.
    pub async fn warn_now(&self, reason: &str, message: &str) -> Result<(), String> {
        let Some(pod) = &self.settings.own_pod else {
            return Err("MY_POD_NAME is not set: no pod to attach the Event to".into());
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), NAMESPACE);
        let event = warning_event(pod, &self.settings.node_name, reason, message);
        events
            .create(&PostParams::default(), &event)
            .await
            .map(|_| ())
            .map_err(|e| format!("creating the Event {reason}: {e}"))
    }
}

fn warning_event(pod: &str, node: &str, reason: &str, message: &str) -> Event {
    let now = k8s_openapi::chrono::Utc::now();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{pod}.")),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.into()),
            namespace: Some(NAMESPACE.into()),
            ..ObjectReference::default()
        },
        type_: Some("Warning".into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.into()),
        }),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        action: Some("Allocate".into()),
        ..Event::default()
    }
}
