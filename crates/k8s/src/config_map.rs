//! The `amazon-vpc-cni` ConfigMap (`ipam::config_map`): read once at start, then followed.
//! RBAC grants get, list and watch of that one object by name, so the watch selects it by name too.

use crate::{api_error, Cluster, ClusterError};
use futures::StreamExt;
use ipam::config_map::NAMESPACE;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use std::collections::BTreeMap;

/// The ConfigMap's data, `None` when there is no such ConfigMap.
pub type Data = Option<BTreeMap<String, String>>;

fn data_of(map: &ConfigMap) -> BTreeMap<String, String> {
    map.data.clone().unwrap_or_default()
}

impl Cluster {
    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// The data of the ConfigMap `name` now.
    pub async fn config_map(&self, name: &str) -> Result<Data, ClusterError> {
        let found = self
            .config_maps()
            .get_opt(name)
            .await
            .map_err(api_error(format!(
                "reading the ConfigMap {NAMESPACE}/{name}"
            )))?;
        Ok(found.as_ref().map(data_of))
    }

    /// Calls `on_change` with the ConfigMap's data each time it changes (created, edited,
    /// deleted), starting with what it is when the watch begins. Runs until the process ends.
    pub async fn follow_config_map(
        &self,
        name: &str,
        mut on_change: impl FnMut(Data),
        mut on_error: impl FnMut(String),
    ) {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = std::pin::pin!(watcher(self.config_maps(), config).default_backoff());
        let mut listing: Option<Data> = None;
        let mut last: Option<Data> = None;
        while let Some(event) = events.next().await {
            let now = match event {
                Err(e) => {
                    on_error(e.to_string());
                    continue;
                }
                Ok(Event::Init) => {
                    listing = Some(None);
                    continue;
                }
                Ok(Event::InitApply(map)) => {
                    listing = Some(Some(data_of(&map)));
                    continue;
                }
                Ok(Event::InitDone) => listing.take().unwrap_or(None),
                Ok(Event::Apply(map)) => Some(data_of(&map)),
                Ok(Event::Delete(_)) => None,
            };
            if last.as_ref() != Some(&now) {
                on_change(now.clone());
                last = Some(now);
            }
        }
    }
}
