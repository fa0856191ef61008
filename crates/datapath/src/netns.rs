//! Network namespaces by path, and running code inside one on a dedicated thread.

use crate::{Error, Result};
use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace file (for example `/var/run/netns/x` or `/proc/<pid>/ns/net`). A path that
    /// does not exist or is not a network namespace is an error naming the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Netns {
            path: path.display().to_string(),
            source,
        })?;
        if !is_namespace_file(&file) {
            return Err(Error::Netns {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a namespace file",
                ),
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `work` on a new thread that has entered this namespace; the caller's thread stays where
    /// it is. The thread ends with `work`, so it never has to find its way back.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        self.run_alongside(work, || ()).0
    }

    /// Runs `work` as [`run`](Self::run) does while `meanwhile` runs on the calling thread, and
    /// returns both results; `meanwhile`'s also when the namespace could not be entered.
    pub fn run_alongside<T: Send, U>(
        &self,
        work: impl FnOnce() -> T + Send,
        meanwhile: impl FnOnce() -> U,
    ) -> (Result<T>, U) {
        let fd = self.fd();
        std::thread::scope(|scope| {
            let inside = scope.spawn(move || {
                // SAFETY: `fd` stays open for the life of `self`, which outlives this scope.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(Error::Netns {
                        path: self.path.display().to_string(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(work())
            });
            let outside = meanwhile();
            let inside = inside
                .join()
                .expect("work inside a network namespace panicked");
            (inside, outside)
        })
    }
}

/// Namespace files live on nsfs (bind-mounted ones too); anything else is a wrong path. Cheaper
/// than entering the namespace to find out, which costs a thread.
fn is_namespace_file(file: &File) -> bool {
    const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
    // SAFETY: `stat` is valid for writes, and the fd is open for the duration of the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) };
    rc == 0 && stat.f_type as libc::c_long == NSFS_MAGIC
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NetNs({})", self.path.display())
    }
}
