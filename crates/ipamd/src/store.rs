//! The checkpoint file: written atomically (temporary file, fsync, rename, fsync of the directory)
//! so that a crash at any moment leaves either the old or the new checkpoint, never a torn one.

use ipam::branches::{SavedBranch, SavedBranches, SAVED_VERSION};
use ipam::checkpoint::{Checkpoint, CheckpointError};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("checkpoint {path}: {source}")]
    Corrupt {
        path: PathBuf,
        source: CheckpointError,
    },
    #[error("branch ENIs {path}: {message}")]
    CorruptBranches { path: PathBuf, message: String },
}

/// Where the node's branch ENIs are saved when it makes them (`POD_ENI_MANAGER=node`): beside
/// the checkpoint, in a file of ours.
const BRANCHES_FILE: &str = "vpc-cni-rs-branches.json";

pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(path: impl Into<PathBuf>) -> Store {
        Store { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `None` when there is no checkpoint yet (a fresh node).
    pub fn load(&self) -> Result<Option<Checkpoint>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        Checkpoint::parse(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })
    }

    /// Moves an unreadable checkpoint aside, keeping it for a human, and returns where it went.
    pub fn quarantine(&self) -> Result<PathBuf, StoreError> {
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(
            ".corrupt-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        ));
        let aside = PathBuf::from(aside);
        fs::rename(&self.path, &aside).map_err(|source| self.io(source))?;
        Ok(aside)
    }

    pub fn save(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        write_atomically(&self.path, &checkpoint.to_json())
    }

    pub fn branches_path(&self) -> PathBuf {
        self.path.with_file_name(BRANCHES_FILE)
    }

    /// The branches saved by the last run; none on a node that never made one.
    pub fn load_branches(&self) -> Result<Vec<SavedBranch>, StoreError> {
        let path = self.branches_path();
        match fs::read(&path) {
            Ok(bytes) => SavedBranches::parse(&bytes)
                .map(|s| s.branches)
                .map_err(|message| StoreError::CorruptBranches { path, message }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    pub fn save_branches(&self, branches: Vec<SavedBranch>) -> Result<(), StoreError> {
        let file = SavedBranches {
            version: SAVED_VERSION.into(),
            branches,
        };
        write_atomically(&self.branches_path(), &file.to_json())
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temporary = path.to_path_buf().into_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipam::checkpoint::{Allocation, Metadata, VERSION};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ipamd-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir.join("ipam.json")
    }

    #[test]
    fn a_saved_checkpoint_loads_back_and_leaves_no_temporary_file() {
        let path = scratch("roundtrip");
        let store = Store::new(&path);
        assert!(store.load().unwrap().is_none());
        let checkpoint = Checkpoint {
            version: VERSION.into(),
            allocations: vec![Allocation {
                network_name: "aws-cni".into(),
                container_id: "c1".into(),
                if_name: "eth0".into(),
                ipv4: Some("10.0.0.7".parse().unwrap()),
                ipv6: None,
                egress_ipv4: None,
                allocation_timestamp: 5,
                metadata: Metadata::default(),
            }],
        };
        store.save(&checkpoint).unwrap();
        assert_eq!(store.load().unwrap(), Some(checkpoint));
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ipam.json")]);
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_naming_the_file_and_can_be_moved_aside() {
        let path = scratch("corrupt");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(
            &path,
            b"{\"version\": \"vpc-cni-ipam/1\", \"allocations\": [",
        )
        .unwrap();
        let store = Store::new(&path);
        let error = store.load().unwrap_err().to_string();
        assert!(error.contains("ipam.json"), "{error}");
        let aside = store.quarantine().unwrap();
        assert!(!path.exists());
        assert!(fs::read(aside).unwrap().starts_with(b"{\"version\""));
    }
}
