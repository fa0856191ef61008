//! A small Kubernetes API server for the tests (no kube-apiserver runs on these machines): objects
//! in memory, with get, list (field selectors, metadata-only answers), watch (chunked event
//! streams that resume from a resourceVersion) and create, for the kinds the daemon uses. It
//! records every request's verb and resource, which the RBAC test compares with the ClusterRole.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The kinds this server holds: (resource, API group, namespaced, kind).
const KINDS: &[(&str, &str, bool, &str)] = &[
    ("nodes", "", false, "Node"),
    ("pods", "", true, "Pod"),
    ("events", "", true, "Event"),
    ("namespaces", "", false, "Namespace"),
    ("configmaps", "", true, "ConfigMap"),
    ("daemonsets", "apps", true, "DaemonSet"),
    (
        "networkpolicies",
        "networking.k8s.io",
        true,
        "NetworkPolicy",
    ),
    ("eniconfigs", "crd.k8s.amazonaws.com", false, "ENIConfig"),
    ("cninodes", "vpcresources.k8s.aws", false, "CNINode"),
    ("serviceaccounts", "", true, "ServiceAccount"),
    (
        "securitygrouppolicies",
        "vpcresources.k8s.aws",
        true,
        "SecurityGroupPolicy",
    ),
    (
        "policyendpoints",
        "networking.k8s.aws",
        true,
        "PolicyEndpoint",
    ),
];

/// One request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
}

struct Change {
    version: u64,
    resource: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    version: u64,
    /// (resource, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    accesses: BTreeSet<Access>,
    stopping: bool,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
}

pub struct KubeApi {
    pub address: SocketAddr,
    shared: Arc<Shared>,
    listener_fd: i32,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn kind_of(resource: &str) -> Option<(&'static str, &'static str, bool, &'static str)> {
    KINDS.iter().copied().find(|k| k.0 == resource)
}

fn api_version(group: &str, kind: &str) -> String {
    match group {
        _ if kind == "SecurityGroupPolicy" => format!("{group}/v1beta1"),
        "" => "v1".to_string(),
        "crd.k8s.amazonaws.com" | "networking.k8s.aws" | "vpcresources.k8s.aws" => {
            format!("{group}/v1alpha1")
        }
        _ => format!("{group}/v1"),
    }
}

impl KubeApi {
    /// Listens on `address` in the caller's network namespace.
    pub fn start(address: SocketAddr) -> std::io::Result<KubeApi> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let listener_fd = listener.as_raw_fd();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if shared.store.lock().expect("store").stopping {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || serve_connection(stream, &shared));
                }
            })
        };
        Ok(KubeApi {
            address,
            shared,
            listener_fd,
            thread: Some(thread),
        })
    }

    /// A kubeconfig that points at this server with no credentials, as the daemon reads it.
    pub fn kubeconfig(&self, host: &str) -> String {
        let server = format!("http://{host}:{}", self.address.port());
        json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": server}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "users": [{"name": "test", "user": {}}],
        })
        .to_string()
    }

    /// Creates or replaces an object, as `kubectl apply` would; watchers see ADDED or MODIFIED.
    pub fn apply(&self, resource: &str, mut object: Value) {
        let (resource, group, _, kind) = kind_of(resource).expect("a kind this server holds");
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        object["apiVersion"] = json!(api_version(group, kind));
        object["kind"] = json!(kind);
        let mut store = self.shared.store.lock().expect("store");
        store.put(resource, (namespace, name), object);
        self.shared.changed.notify_all();
    }

    pub fn delete(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let (resource, ..) = kind_of(resource).expect("a kind this server holds");
        let mut store = self.shared.store.lock().expect("store");
        let found = store.remove(resource, namespace, name);
        self.shared.changed.notify_all();
        found
    }

    /// Every object of `resource`, in name order.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let store = self.shared.store.lock().expect("store");
        store
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// The resourceVersion of the last change to `resource` (0 if none): a watcher that has seen
    /// it has seen every change of that kind.
    pub fn version_of(&self, resource: &str) -> u64 {
        let store = self.shared.store.lock().expect("store");
        store
            .history
            .iter()
            .filter(|c| c.resource == resource)
            .map(|c| c.version)
            .max()
            .unwrap_or(0)
    }

    /// What was asked of the server so far.
    pub fn accesses(&self) -> BTreeSet<Access> {
        self.shared.store.lock().expect("store").accesses.clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shared.store.lock().expect("store").stopping = true;
        self.shared.changed.notify_all();
        // SAFETY: the listener is owned by the thread joined below, so the fd is still open.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Store {
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn put(&mut self, resource: &'static str, key: (String, String), mut object: Value) {
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{version}"));
        }
        let key = (resource.to_string(), key.0, key.1);
        self.objects.insert(key, object.clone());
        self.history.push(Change {
            version,
            resource,
            object,
        });
    }

    fn remove(&mut self, resource: &'static str, namespace: &str, name: &str) -> bool {
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let Some(mut object) = self.objects.remove(&key) else {
            return false;
        };
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        object["__deleted"] = json!(true);
        self.history.push(Change {
            version,
            resource,
            object,
        });
        true
    }
}

struct Request {
    method: String,
    path: Vec<String>,
    query: BTreeMap<String, String>,
    metadata_only: bool,
    body: Vec<u8>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let head = simvpc_http::http::read_head(reader).ok()??;
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let length: usize = match header("content-length") {
        Some(v) => v.parse().ok()?,
        None => 0,
    };
    let metadata_only = header("accept").is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    let simvpc_http::http::Head { method, target, .. } = head;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Some(Request {
        method,
        path: path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect(),
        metadata_only,
        body,
    })
}

/// Where a path points: (group, resource, namespace, name), with `/status` after the name the
/// status subresource (`resource` is then `nodes/status`, as RBAC names it).
fn route(path: &[String]) -> Option<(String, String, Option<String>, Option<String>)> {
    let rest = match path {
        [api, v1, rest @ ..] if api == "api" && v1 == "v1" => (String::new(), rest),
        [apis, group, _version, rest @ ..] if apis == "apis" => (group.clone(), rest),
        _ => return None,
    };
    let (group, rest) = rest;
    let (namespace, resource, tail) = match rest {
        [ns, namespace, resource, tail @ ..] if ns == "namespaces" => {
            (Some(namespace.clone()), resource, tail)
        }
        [resource, tail @ ..] => (None, resource, tail),
        _ => return None,
    };
    match tail {
        [] => Some((group, resource.clone(), namespace, None)),
        [name] => Some((group, resource.clone(), namespace, Some(name.clone()))),
        [name, sub] if sub == "status" => Some((
            group,
            format!("{resource}/status"),
            namespace,
            Some(name.clone()),
        )),
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

/// `spec.nodeName=x,metadata.name=y`: every term must hold.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let Some((path, want)) = term.split_once('=') else {
            return false;
        };
        let got = path
            .split('.')
            .try_fold(object, |v, key| v.get(key))
            .and_then(Value::as_str)
            .unwrap_or("");
        got == want.trim_start_matches('=')
    })
}

fn metadata_view(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": object["metadata"]})
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        if code < 300 { "OK" } else { "Error" },
        body.len()
    );
    stream.write_all(response.as_bytes())
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    // A response goes out in several writes: with Nagle's algorithm each after the first waits for
    // the client's delayed ACK, 40 ms a request.
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        if request.method == "GET"
            && request
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1")
        {
            watch(&mut writer, shared, &request);
            return;
        }
        let (code, body) = answer(shared, &request);
        if respond(&mut writer, code, &body).is_err() {
            return;
        }
    }
}

fn answer(shared: &Shared, request: &Request) -> (u16, Value) {
    if request.path == ["version"] {
        return (
            200,
            json!({"major": "1", "minor": "31", "gitVersion": "v1.31.0"}),
        );
    }
    let Some((group, resource, namespace, name)) = route(&request.path) else {
        return status(404, "NotFound", "no such path");
    };
    if let Some(object) = resource.strip_suffix("/status") {
        return patch_status(shared, request, group, object, namespace, name);
    }
    let Some((resource, kind_group, namespaced, kind)) = kind_of(&resource) else {
        return status(
            404,
            "NotFound",
            &format!("the server does not serve {resource}"),
        );
    };
    if group != kind_group || (namespace.is_some() && !namespaced) {
        return status(404, "NotFound", "no such path");
    }
    let verb = match (request.method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) => "list",
        ("POST", None) => "create",
        ("PATCH", Some(_)) => "patch",
        _ => return status(405, "MethodNotAllowed", "not served here"),
    };
    let mut store = shared.store.lock().expect("store");
    store.accesses.insert(Access {
        verb: verb.into(),
        group: group.clone(),
        resource: resource.into(),
    });
    let namespace = namespace.unwrap_or_default();
    match verb {
        "get" => {
            let key = (resource.to_string(), namespace, name.unwrap_or_default());
            match store.objects.get(&key) {
                Some(o) if request.metadata_only => (200, metadata_view(o)),
                Some(o) => (200, o.clone()),
                None => status(
                    404,
                    "NotFound",
                    &format!("{resource} \"{}\" not found", key.2),
                ),
            }
        }
        // A JSON merge patch (RFC 7386), the only kind the daemon sends.
        "patch" => patch_object(
            &mut store,
            shared,
            resource,
            (namespace.clone(), name.unwrap_or_default()),
            &request.body,
            merge_patch,
        ),
        "list" => {
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((r, ns, _), o)| {
                    r == resource
                        && (namespace.is_empty() || *ns == namespace)
                        && selected(o, request.query.get("fieldSelector"))
                })
                .map(|(_, o)| {
                    if request.metadata_only {
                        metadata_view(o)
                    } else {
                        o.clone()
                    }
                })
                .collect();
            let list_kind = if request.metadata_only {
                "PartialObjectMetadataList".to_string()
            } else {
                format!("{kind}List")
            };
            (
                200,
                json!({"apiVersion": if request.metadata_only { "meta.k8s.io/v1".to_string() } else { api_version(&group, kind) },
                       "kind": list_kind,
                       "metadata": {"resourceVersion": store.version.to_string()},
                       "items": items}),
            )
        }
        _ => {
            let Ok(mut object) = serde_json::from_slice::<Value>(&request.body) else {
                return status(400, "BadRequest", "the body is not JSON");
            };
            if object["metadata"]["name"].is_null() {
                let prefix = object["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                object["metadata"]["name"] = json!(format!("{prefix}{}", store.version + 1));
            }
            object["metadata"]["namespace"] = json!(namespace);
            object["apiVersion"] = json!(api_version(&group, kind));
            object["kind"] = json!(kind);
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string();
            store.put(resource, (namespace.clone(), name.clone()), object);
            shared.changed.notify_all();
            (
                201,
                store.objects[&(resource.to_string(), namespace, name)].clone(),
            )
        }
    }
}

/// A JSON merge patch of an object's status (`PATCH .../NAME/status`): only `status` changes.
fn patch_status(
    shared: &Shared,
    request: &Request,
    group: String,
    resource: &str,
    namespace: Option<String>,
    name: Option<String>,
) -> (u16, Value) {
    let Some((resource, kind_group, ..)) = kind_of(resource) else {
        return status(404, "NotFound", "no such path");
    };
    if request.method != "PATCH" || group != kind_group {
        return status(405, "MethodNotAllowed", "not served here");
    }
    let mut store = shared.store.lock().expect("store");
    store.accesses.insert(Access {
        verb: "patch".into(),
        group,
        resource: format!("{resource}/status"),
    });
    patch_object(
        &mut store,
        shared,
        resource,
        (namespace.unwrap_or_default(), name.unwrap_or_default()),
        &request.body,
        |object, patch| {
            if !patch["status"].is_null() {
                merge_patch(&mut object["status"], &patch["status"]);
            }
        },
    )
}

/// Applies the patch in `body` to the stored object at `key` with `apply`, stores the result and
/// wakes the watches; the answer is the object as stored.
fn patch_object(
    store: &mut Store,
    shared: &Shared,
    resource: &'static str,
    (namespace, name): (String, String),
    body: &[u8],
    apply: impl FnOnce(&mut Value, &Value),
) -> (u16, Value) {
    let key = (resource.to_string(), namespace, name);
    let Some(mut object) = store.objects.get(&key).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("{resource} \"{}\" not found", key.2),
        );
    };
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the patch is not JSON");
    };
    apply(&mut object, &patch);
    store.put(resource, (key.1.clone(), key.2.clone()), object);
    shared.changed.notify_all();
    (200, store.objects[&key].clone())
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        if value.is_null() {
            target.as_object_mut().expect("an object").remove(key);
        } else {
            merge_patch(&mut target[key.as_str()], value);
        }
    }
}

/// A chunked stream of watch events after `resourceVersion`, until `timeoutSeconds` or the
/// client goes away.
fn watch(writer: &mut TcpStream, shared: &Shared, request: &Request) {
    let Some((group, resource, namespace, None)) = route(&request.path) else {
        let _ = respond(writer, 404, &status(404, "NotFound", "no such path").1);
        return;
    };
    let Some((resource, _, _, _)) = kind_of(&resource) else {
        let _ = respond(writer, 404, &status(404, "NotFound", "not served").1);
        return;
    };
    let timeout = request
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let deadline = Instant::now() + timeout;
    let selector = request.query.get("fieldSelector").cloned();
    let namespace = namespace.unwrap_or_default();
    let mut after: u64 = request
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut store = shared.store.lock().expect("store");
    store.accesses.insert(Access {
        verb: "watch".into(),
        group,
        resource: resource.into(),
    });
    if write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    // Whether each object matched the selector at its last change, so that an object moving out
    // of the selection is seen as DELETED; what happened up to `after` the client has seen.
    let id = |o: &Value| {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        )
    };
    let matches = |o: &Value| {
        o.get("__deleted").is_none()
            && (namespace.is_empty() || o["metadata"]["namespace"].as_str() == Some(&namespace))
            && selected(o, selector.as_ref())
    };
    let mut matched: BTreeMap<String, bool> = BTreeMap::new();
    for change in store
        .history
        .iter()
        .filter(|c| c.version <= after && c.resource == resource)
    {
        matched.insert(id(&change.object), matches(&change.object));
    }
    loop {
        let mut lines = Vec::new();
        for change in store
            .history
            .iter()
            .filter(|c| c.version > after && c.resource == resource)
        {
            let now_matches = matches(&change.object);
            let was = matched
                .insert(id(&change.object), now_matches)
                .unwrap_or(false);
            let kind = match (was, now_matches) {
                (false, true) => "ADDED",
                (true, true) => "MODIFIED",
                (true, false) => "DELETED",
                (false, false) => continue,
            };
            let mut object = change.object.clone();
            if let Some(o) = object.as_object_mut() {
                o.remove("__deleted");
            }
            if request.metadata_only {
                object = metadata_view(&object);
            }
            lines.push(json!({"type": kind, "object": object}).to_string() + "\n");
        }
        after = store.version;
        for line in lines {
            if write!(writer, "{:x}\r\n{line}\r\n", line.len()).is_err() {
                return;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || store.stopping {
            let _ = write!(writer, "0\r\n\r\n");
            return;
        }
        store = shared
            .changed
            .wait_timeout(store, left.min(Duration::from_secs(1)))
            .expect("store")
            .0;
    }
}
