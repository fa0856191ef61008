//! Errors as the CNI spec prints them: `{cniVersion, code, msg, details}` on stdout, non-zero exit.

use serde_json::json;

/// The spec's well-known error codes (and libcni's 999 for everything internal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    DecodingFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// CHECK found the pod's network differing from what ADD set up.
    CheckFailed = 100,
    Internal = 999,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        let mut value = json!({
            "cniVersion": cni_version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            value["details"] = self.details.clone().into();
        }
        value.to_string()
    }
}

impl From<datapath::Error> for CniError {
    fn from(e: datapath::Error) -> Self {
        match e {
            datapath::Error::Netns { .. } => CniError::new(Code::UnknownContainer, e.to_string()),
            datapath::Error::Invalid(_) => CniError::new(Code::InvalidConfig, e.to_string()),
            _ => CniError::new(Code::Internal, e.to_string()),
        }
    }
}
