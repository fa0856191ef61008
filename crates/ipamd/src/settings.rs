//! Settings from the cluster (`ipam::config_map`): the ConfigMap read at start over the
//! environment, then followed. `review` decides, purely, what a version of the ConfigMap means
//! against what the daemon started with; `from_cluster` and `follow` do the reading, the Warning
//! Events and the hand-over to the control loop.

use crate::control::{Event, SettingsView};
use ipam::config::{Config, ConfigError};
use ipam::config_map::{self, ClusterSettings};
use ipam::settings::PoolSettings;
use k8s::Cluster;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The process's environment, read once: the layer under the ConfigMap's settings.
pub type Environment = Arc<BTreeMap<String, String>>;

/// What one version of the ConfigMap (`None`: there is none) means: the configuration it gives,
/// the keys taken (for the next version: a bad value keeps the value `last` had), and the view
/// for `/v1/config`, whose `pending_restart` lists what differs from `at_start` (the keys the
/// daemon started with; `None`: this version is the start) and cannot change while it runs.
pub fn review(
    name: &str,
    data: Option<&BTreeMap<String, String>>,
    last: &ClusterSettings,
    at_start: Option<&ClusterSettings>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, ClusterSettings, SettingsView), ConfigError> {
    let from_map = ClusterSettings::from_data(data.unwrap_or(&BTreeMap::new()));
    let (config, taken) =
        config_map::layered(&from_map, last, env, &|c| c.unsupported_by_daemon())?;
    let at_start = at_start.unwrap_or(&taken);
    let (_, restart) = config_map::changes(&|k| at_start.get(k, env), &|k| taken.get(k, env));
    let pending = restart
        .iter()
        .map(|variable| {
            // In the user's words: the key of the ConfigMap that sets it now, or set it at start.
            let key = taken.key_of(variable);
            let key = if key == *variable {
                at_start.key_of(variable)
            } else {
                key
            };
            match taken.get(variable, env) {
                Some(value) => format!("{key}={value:?}"),
                None => format!("{key} removed"),
            }
        })
        .collect();
    let view = SettingsView {
        name: name.to_string(),
        config_map: Some(data.is_some()),
        keys: taken
            .keys
            .iter()
            .map(|(variable, key)| (key.clone(), variable.clone()))
            .collect(),
        refused: taken.refused.clone(),
        others: taken.others.clone(),
        pending_restart: pending,
    };
    Ok((config, taken, view))
}

/// The settings with the ConfigMap `name` read once over the environment, at start; what it set
/// that was refused goes to a Warning Event. Returns what to start with, what was taken, and what
/// was said.
pub async fn from_cluster(
    cluster: &Cluster,
    name: &str,
    config: Config,
    environment: &Environment,
) -> (Config, SettingsView, ClusterSettings, Vec<String>) {
    let data = match cluster.config_map(name).await {
        Ok(data) => data,
        Err(e) => {
            tracing::warn!(error = %e, "the ConfigMap could not be read; the environment's settings stand");
            return (
                config,
                SettingsView::default(),
                ClusterSettings::default(),
                Vec::new(),
            );
        }
    };
    let env = |k: &str| environment.get(k).cloned();
    let none = ClusterSettings::default();
    match review(name, data.as_ref(), &none, None, &env) {
        Ok((config, taken, view)) => {
            let said = report(cluster, &view, &[]).await;
            (config, view, taken, said)
        }
        // The environment alone parsed in main(): only the ConfigMap can be at fault.
        Err(e) => {
            tracing::warn!(error = %e, "the ConfigMap's settings set aside");
            (config, SettingsView::default(), none, Vec::new())
        }
    }
}

/// Warning Events for what the ConfigMap sets that is not taken, but for what `said` holds (said
/// about the previous version); returns all that applies now.
async fn report(cluster: &Cluster, view: &SettingsView, said: &[String]) -> Vec<String> {
    let place = format!("ConfigMap {}/{}", config_map::NAMESPACE, view.name);
    let notes = view
        .refused
        .iter()
        .map(|r| ("InvalidSetting", format!("{place}: {r}; the previous value stands")))
        .chain(view.pending_restart.iter().map(|p| {
            ("RestartNeeded", format!("{place}: {p} takes effect when the daemon restarts (kubectl rollout restart daemonset -n kube-system)"))
        }));
    let mut now = Vec::new();
    for (reason, message) in notes {
        now.push(message.clone());
        if said.contains(&message) {
            continue;
        }
        tracing::warn!(%reason, %message, "setting not applied");
        let sent = tokio::time::timeout(Duration::from_secs(5), cluster.warn_now(reason, &message))
            .await
            .unwrap_or_else(|_| Err("the API server did not answer in 5 s".into()));
        if let Err(why) = sent {
            tracing::warn!(error = %why, "could not send the Event");
        }
    }
    now
}

/// Follows the ConfigMap `name`: each version's live settings go to the control loop; the others
/// are reported as waiting for a restart.
pub async fn follow(
    cluster: Arc<Cluster>,
    name: String,
    events: mpsc::UnboundedSender<Event>,
    environment: Environment,
    at_start: ClusterSettings,
    mut said: Vec<String>,
) {
    let env = move |k: &str| environment.get(k).cloned();
    let mut last = at_start.clone();
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    {
        let (cluster, name) = (cluster.clone(), name.clone());
        tokio::spawn(async move {
            cluster
                .follow_config_map(
                    &name,
                    move |data| drop(changes_tx.send(data)),
                    |e| tracing::warn!(error = %e, "ConfigMap watch"),
                )
                .await
        });
    }
    while let Some(data) = changes.recv().await {
        let (config, taken, view) = match review(&name, data.as_ref(), &last, Some(&at_start), &env)
        {
            Ok(reviewed) => reviewed,
            Err(e) => {
                tracing::warn!(error = %e, "the ConfigMap's settings set aside");
                continue;
            }
        };
        said = report(&cluster, &view, &said).await;
        last = taken;
        let _ = events.send(Event::Settings {
            pool: PoolSettings::from_config(&config),
            view,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn what_waits_for_a_restart_is_measured_from_the_start_in_the_users_words() {
        let env = |k: &str| (k == "WARM_IP_TARGET").then(|| "1".to_string());
        let none = ClusterSettings::default();
        let started = data(&[("enable-prefix-delegation", "true")]);
        let (config, at_start, view) = review("cni", Some(&started), &none, None, &env).unwrap();
        assert!(config.prefix_delegation && view.pending_restart.is_empty());
        assert_eq!(
            view.keys["enable-prefix-delegation"],
            "ENABLE_PREFIX_DELEGATION"
        );

        // A live change and a key dropped that only a restart undoes.
        let next = data(&[("warm-ip-target", "4")]);
        let (config, taken, view) =
            review("cni", Some(&next), &at_start, Some(&at_start), &env).unwrap();
        assert_eq!(config.warm_ip_target, 4);
        assert_eq!(view.pending_restart, ["enable-prefix-delegation removed"]);

        // A bad value keeps the last one taken and is refused by name.
        let bad = data(&[("warm-ip-target", "x")]);
        let (config, _, view) = review("cni", Some(&bad), &taken, Some(&at_start), &env).unwrap();
        assert_eq!(config.warm_ip_target, 4);
        assert!(
            view.refused[0].starts_with("warm-ip-target=\"x\""),
            "{:?}",
            view.refused
        );

        // No ConfigMap: the environment's values, and it says so.
        let (config, _, view) = review("cni", None, &taken, Some(&at_start), &env).unwrap();
        assert_eq!((config.warm_ip_target, view.config_map), (1, Some(false)));
    }
}
