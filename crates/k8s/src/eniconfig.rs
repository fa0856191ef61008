//! The ENIConfig custom resource (`crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped) and the
//! watch that follows which one this node selects and what it says.

use crate::{node::NodeView, Cluster};
use futures::StreamExt;
use ipam::pool::EniConfigSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::ClusterResourceScope;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EniConfig {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: EniConfigBody,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EniConfigBody {
    #[serde(default)]
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
}

impl Resource for EniConfig {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ENIConfig".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "crd.k8s.amazonaws.com".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "eniconfigs".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl EniConfigBody {
    pub fn to_spec(&self) -> Result<EniConfigSpec, String> {
        if !self.subnet.starts_with("subnet-") {
            return Err(format!("spec.subnet {:?} is not a subnet id", self.subnet));
        }
        if let Some(bad) = self.security_groups.iter().find(|g| !g.starts_with("sg-")) {
            return Err(format!(
                "spec.securityGroups: {bad:?} is not a security group id"
            ));
        }
        Ok(EniConfigSpec {
            subnet: self.subnet.clone(),
            security_groups: self.security_groups.clone(),
        })
    }
}

/// The ENIConfig this node selects, and its spec or why there is none to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniConfigSelection {
    pub name: String,
    pub spec: Result<EniConfigSpec, String>,
}

/// What the two watches have shown so far.
#[derive(Default)]
struct Seen {
    selected: Option<String>,
    bodies: BTreeMap<String, EniConfigBody>,
    listing: Option<BTreeMap<String, EniConfigBody>>,
}

impl Seen {
    fn selection(&self) -> Option<EniConfigSelection> {
        let name = self.selected.clone()?;
        let spec = match self.bodies.get(&name) {
            Some(body) => body.to_spec(),
            None => Err(format!("there is no ENIConfig named {name:?}")),
        };
        Some(EniConfigSelection { name, spec })
    }

    fn config_event(&mut self, event: Event<EniConfig>) {
        let name = |c: &EniConfig| c.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(c) => {
                if let Some(listing) = &mut self.listing {
                    listing.insert(name(&c), c.spec);
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.bodies = listing;
                }
            }
            Event::Apply(c) => {
                self.bodies.insert(name(&c), c.spec);
            }
            Event::Delete(c) => {
                self.bodies.remove(&name(&c));
            }
        }
    }
}

enum Change {
    Node(NodeView),
    Config(Box<Event<EniConfig>>),
}

impl Cluster {
    /// Follows the Node's selection and the ENIConfig objects; calls `on_change` with the first
    /// selection and with every one that differs from the last. Runs until the process ends;
    /// API errors are retried with backoff and passed to `on_error`.
    pub async fn follow_eni_config(
        &self,
        mut on_change: impl FnMut(EniConfigSelection),
        mut on_error: impl FnMut(String),
    ) {
        let node_changes = self.node_views().map(|v| v.map(Change::Node));
        let configs: Api<EniConfig> = Api::all(self.client.clone());
        let config_changes = watcher(configs, watcher::Config::default())
            .default_backoff()
            .map(|e| e.map(|e| Change::Config(Box::new(e))));
        let mut changes = std::pin::pin!(futures::stream::select(node_changes, config_changes));
        let mut seen = Seen::default();
        let mut last = None;
        while let Some(change) = changes.next().await {
            match change {
                Ok(Change::Node(view)) => seen.selected = Some(view.eni_config_name),
                Ok(Change::Config(event)) => seen.config_event(*event),
                Err(e) => {
                    on_error(e.to_string());
                    continue;
                }
            }
            // Mid-listing the set of ENIConfigs is incomplete: an object not listed yet would
            // look missing.
            if seen.listing.is_some() {
                continue;
            }
            let selection = seen.selection();
            if selection.is_some() && selection != last {
                on_change(selection.clone().expect("checked"));
                last = selection;
            }
        }
    }

    /// The ENIConfig named `name`, read once.
    pub async fn eni_config(&self, name: &str) -> Result<EniConfigSelection, crate::ClusterError> {
        let configs: Api<EniConfig> = Api::all(self.client.clone());
        let found = configs
            .get_opt(name)
            .await
            .map_err(crate::api_error(format!("reading the ENIConfig {name}")))?;
        Ok(EniConfigSelection {
            name: name.to_string(),
            spec: match found {
                Some(c) => c.spec.to_spec(),
                None => Err(format!("there is no ENIConfig named {name:?}")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, subnet: &str) -> EniConfig {
        EniConfig {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: EniConfigBody {
                subnet: subnet.into(),
                security_groups: vec!["sg-1".into()],
            },
        }
    }

    #[test]
    fn an_existing_object_parses_and_a_bad_one_says_why() {
        let c: EniConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
            "metadata": {"name": "us-west-2a"},
            "spec": {"subnet": "subnet-0abc", "securityGroups": ["sg-1", "sg-2"]}}))
        .expect("an ENIConfig");
        assert_eq!(
            c.spec.to_spec(),
            Ok(EniConfigSpec {
                subnet: "subnet-0abc".into(),
                security_groups: vec!["sg-1".into(), "sg-2".into()]
            })
        );
        let bad = config("x", "10.0.0.0/24").spec.to_spec().unwrap_err();
        assert!(bad.contains("not a subnet id"), "{bad}");
    }

    #[test]
    fn the_selection_follows_the_node_and_the_objects() {
        let mut seen = Seen::default();
        assert_eq!(seen.selection(), None, "nothing before the Node is seen");
        seen.config_event(Event::Init);
        seen.config_event(Event::InitApply(config("a", "subnet-a")));
        seen.selected = Some("b".into());
        seen.config_event(Event::InitDone);
        let missing = seen.selection().expect("a selection");
        assert_eq!(missing.name, "b");
        assert!(missing.spec.is_err());
        seen.config_event(Event::Apply(config("b", "subnet-b")));
        assert_eq!(seen.selection().unwrap().spec.unwrap().subnet, "subnet-b");
        seen.config_event(Event::Delete(config("b", "subnet-b")));
        assert!(seen.selection().unwrap().spec.is_err());
        // A relist replaces what was known: objects deleted while the watch was down go.
        seen.config_event(Event::Apply(config("b", "subnet-b")));
        seen.config_event(Event::Init);
        seen.config_event(Event::InitApply(config("a", "subnet-a")));
        seen.config_event(Event::InitDone);
        assert!(seen.selection().unwrap().spec.is_err());
    }
}
