//! Structured logs on stderr (the container's log), or in the file `AWS_VPC_K8S_CNI_LOG_FILE` names
//! when it is set: one line per event, `key=value` text or JSON (`VPC_CNI_LOG_FORMAT=json`), at or
//! above the level `AWS_VPC_K8S_CNI_LOGLEVEL` sets (upstream's DEBUG, INFO, WARN, ERROR).

use std::fmt::Display;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

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

    fn name(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

struct Logger {
    level: Level,
    json: bool,
    out: Mutex<Box<dyn Write + Send>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Sets up logging once; later calls are ignored. `file`: append there instead of stderr.
pub fn init(level: Level, json: bool, file: Option<&str>) -> std::io::Result<()> {
    let out: Box<dyn Write + Send> = match file {
        Some(path) => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(dir)?;
            }
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        }
        None => Box::new(std::io::stderr()),
    };
    let _ = LOGGER.set(Logger {
        level,
        json,
        out: Mutex::new(out),
    });
    Ok(())
}

pub fn event(level: Level, message: &str, fields: &[(&str, &dyn Display)]) {
    let Some(logger) = LOGGER.get() else { return };
    if level < logger.level {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ts = format!("{}.{:03}", now.as_secs(), now.subsec_millis());
    let line = if logger.json {
        let mut object = serde_json::Map::new();
        object.insert("ts".into(), ts.into());
        object.insert("level".into(), level.name().into());
        object.insert("msg".into(), message.into());
        for (key, value) in fields {
            object.insert((*key).into(), value.to_string().into());
        }
        serde_json::Value::Object(object).to_string()
    } else {
        let mut line = format!("{ts} {:5} {message}", level.name());
        for (key, value) in fields {
            let value = value.to_string();
            if value.contains(' ') || value.is_empty() {
                line.push_str(&format!(" {key}={value:?}"));
            } else {
                line.push_str(&format!(" {key}={value}"));
            }
        }
        line
    };
    let mut out = logger.out.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn debug(message: &str, fields: &[(&str, &dyn Display)]) {
    event(Level::Debug, message, fields)
}

pub fn info(message: &str, fields: &[(&str, &dyn Display)]) {
    event(Level::Info, message, fields)
}

pub fn warn(message: &str, fields: &[(&str, &dyn Display)]) {
    event(Level::Warn, message, fields)
}

pub fn error(message: &str, fields: &[(&str, &dyn Display)]) {
    event(Level::Error, message, fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_level_names_parse_and_others_are_refused() {
        assert_eq!(Level::parse("DEBUG"), Ok(Level::Debug));
        assert_eq!(Level::parse("Info"), Ok(Level::Info));
        assert_eq!(Level::parse("warn"), Ok(Level::Warn));
        assert!(Level::parse("loud").unwrap_err().contains("loud"));
    }
}
