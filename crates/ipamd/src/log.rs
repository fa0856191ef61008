//! The daemon's logs are `tracing` events; this is their one subscriber. On stderr (the container's
//! log) or in the file `AWS_VPC_K8S_CNI_LOG_FILE` names: one line per event, `key=value` text or
//! JSON (`VPC_CNI_LOG_FORMAT=json`) with upstream's lower-case level names, at or above the level
//! `AWS_VPC_K8S_CNI_LOGLEVEL` sets (upstream's DEBUG, INFO, WARN, ERROR). The libraries under the
//! daemon (kube-rs, hyper, the AWS SDK) log through `tracing` too: their warnings and errors are
//! kept, with the library named in `target`.

use std::fmt::{self, Write as _};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn parse(text: &str) -> Result<Level, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "debug" | "trace" => Ok(Level::Debug),
            "info" => Ok(Level::Info),
            "warn" | "warning" => Ok(Level::Warn),
            "error" | "fatal" => Ok(Level::Error),
            other => Err(format!(
                "AWS_VPC_K8S_CNI_LOGLEVEL={other:?}: expected DEBUG, INFO, WARN or ERROR"
            )),
        }
    }

    fn filter(self) -> LevelFilter {
        match self {
            Level::Debug => LevelFilter::DEBUG,
            Level::Info => LevelFilter::INFO,
            Level::Warn => LevelFilter::WARN,
            Level::Error => LevelFilter::ERROR,
        }
    }
}

/// The crates of this project, logged at the configured level; every other crate at WARN.
const OURS: [&str; 6] = ["ipamd", "vpc_ipamd", "cloud", "k8s", "datapath", "ipam"];

/// Sets up logging once; later calls are ignored. `file`: append there instead of stderr.
pub fn init(level: Level, json: bool, file: Option<&str>) -> std::io::Result<()> {
    let writer = match file {
        Some(path) => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            BoxMakeWriter::new(Mutex::new(file))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let _ = subscriber(level, json, writer).try_init();
    Ok(())
}

fn subscriber<W>(level: Level, json: bool, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let targets = OURS
        .iter()
        .fold(Targets::new().with_default(LevelFilter::WARN), |t, ours| {
            t.with_target(*ours, level.filter())
        });
    tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .event_format(Line { json })
            .with_writer(writer)
            .with_filter(targets),
    )
}

/// One event as one line: `ts level message key=value...`, or the same as a JSON object.
struct Line {
    json: bool,
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            name => self.pairs.push((name, value)),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let crate_name = meta.target().split("::").next().unwrap_or_default();
        if !OURS.contains(&crate_name) {
            fields.pairs.push(("target", meta.target().to_string()));
        }
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            _ => "debug",
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ts = format!("{}.{:03}", now.as_secs(), now.subsec_millis());
        if self.json {
            let mut object = serde_json::Map::new();
            object.insert("ts".into(), ts.into());
            object.insert("level".into(), level.into());
            object.insert("msg".into(), fields.message.into());
            for (key, value) in fields.pairs {
                object.insert(key.into(), value.into());
            }
            writeln!(writer, "{}", serde_json::Value::Object(object))
        } else {
            let mut line = format!("{ts} {level:5} {}", fields.message);
            for (key, value) in fields.pairs {
                if value.contains(' ') || value.is_empty() {
                    let _ = write!(line, " {key}={value:?}");
                } else {
                    let _ = write!(line, " {key}={value}");
                }
            }
            writeln!(writer, "{line}")
        }
    }
}

/// Lines written to memory, for tests.
#[cfg(test)]
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(level: Level, json: bool, emit: impl FnOnce()) -> String {
        let out = Captured::default();
        let sink = out.clone();
        tracing::subscriber::with_default(subscriber(level, json, move || sink.clone()), emit);
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn upstream_level_names_parse_and_others_are_refused() {
        assert_eq!(Level::parse("DEBUG"), Ok(Level::Debug));
        assert_eq!(Level::parse("Info"), Ok(Level::Info));
        assert_eq!(Level::parse("warn"), Ok(Level::Warn));
        assert!(Level::parse("loud").unwrap_err().contains("loud"));
    }

    #[test]
    fn text_lines_carry_the_level_the_message_and_the_fields() {
        let eni = "eni-1";
        let out = logged(Level::Info, false, || {
            tracing::info!(eni = %eni, device = 2, reason = %"a b", "ENI attached");
            tracing::debug!("not at info");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let (ts, rest) = lines[0].split_once(' ').unwrap();
        assert!(ts.parse::<f64>().is_ok(), "{ts}");
        assert_eq!(
            rest,
            r#"info  ENI attached eni=eni-1 device=2 reason="a b""#
        );
    }

    #[test]
    fn json_lines_are_objects_with_upstreams_keys() {
        let out = logged(Level::Debug, true, || {
            tracing::warn!(error = %"denied", "EC2 action failed");
        });
        let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["level"], "warn");
        assert_eq!(line["msg"], "EC2 action failed");
        assert_eq!(line["error"], "denied");
        assert!(line["ts"].as_str().unwrap().contains('.'));
        assert!(
            line.get("target").is_none(),
            "our own events name no target"
        );
    }

    #[test]
    fn libraries_log_their_warnings_only_and_say_who_they_are() {
        let out = logged(Level::Debug, false, || {
            tracing::warn!(target: "kube_runtime::watcher", "watch failed");
            tracing::info!(target: "hyper::proto", "chatty");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("watch failed target=kube_runtime::watcher"),
            "{out}"
        );
    }
}
