//! Child processes that die with their owner, with their output kept for failure messages.
//!
//! - [`ChildGuard`]: a spawned command whose stdout and stderr go to one log file in the
//!   per-run directory; on drop it gets SIGTERM, then SIGKILL after [`TERM_GRACE`], and is
//!   reaped. The child leads its own process group and the group is signalled, so helpers
//!   it started go too.
//! - [`wait_until`] / [`wait_for`]: poll a condition every [`POLL_INTERVAL`] until a
//!   deadline; the error names what was awaited. Tests wait on conditions, never on sleeps.
//! - [`listen_addresses`]: where a podiam daemon started with port 0 listens, from its
//!   `--listen-address-file`; [`ClosedPort`]: a loopback port held, where nothing listens.
//!   No port is ever picked by binding, closing and handing it on: another process could
//!   take it in between.
//! - [`run_dir`], [`scratch_dir`]: a place for a child's files.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// How long a child has to exit after SIGTERM before it gets SIGKILL on drop. Our children
/// (python servers, podiam binaries) exit within milliseconds; this only bounds a hang.
pub const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long drop waits for the kernel to finish a SIGKILLed child before leaving it to
/// tokio's orphan reaper.
const KILL_REAP_BOUND: Duration = Duration::from_secs(2);
/// Poll interval of [`wait_until`] and of drop's reaping loop: short enough that tests
/// are not slowed, long enough not to spin.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Errors of the process helpers.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Creating the per-run directory failed.
    #[error("creating the test run directory {}", .path.display())]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating a log file failed.
    #[error("creating log file {}", .path.display())]
    LogFile {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The command could not be started.
    #[error("starting {name}")]
    Spawn {
        /// The guard's name.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The child is already gone (reaped) or never had a pid.
    #[error("{name} has already exited")]
    Exited {
        /// The guard's name.
        name: String,
    },
    /// Sending a signal failed.
    #[error("sending {signal} to {name}")]
    Signal {
        /// The guard's name.
        name: String,
        /// The signal.
        signal: Signal,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// Waiting for the child failed.
    #[error("waiting for {name}")]
    Wait {
        /// The guard's name.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A child stopped with SIGTERM exited with a failure.
    #[error("{name} exited with {status}; log:\n{log}")]
    Unclean {
        /// The guard's name.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// A deadline passed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        after: Duration,
    },
    /// Holding a port failed.
    #[error("holding a loopback port")]
    Reserve(#[source] io::Error),
}

static RUN_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// This test process's own directory, created on first use:
/// `$TMPDIR/podiam-tests/run-PID-UNIXSECS` for root, `$TMPDIR/podiam-tests-UID/…` for
/// another user (so that a root run's directory never stops a user's run). Kept after the
/// run so logs can be read after a failure.
pub fn run_dir() -> Result<PathBuf, ProcessError> {
    let mut slot = RUN_DIR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = slot.as_ref() {
        return Ok(dir.clone());
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let uid = nix::unistd::geteuid();
    let parent = if uid.is_root() {
        "podiam-tests".to_string()
    } else {
        format!("podiam-tests-{uid}")
    };
    let dir = std::env::temp_dir()
        .join(parent)
        .join(format!("run-{}-{secs}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| ProcessError::RunDir {
        path: dir.clone(),
        source,
    })?;
    *slot = Some(dir.clone());
    Ok(dir)
}

/// A fresh, unique subdirectory of [`run_dir`] (for certificates, configs, sockets).
pub fn scratch_dir(label: &str) -> Result<PathBuf, ProcessError> {
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = run_dir()?.join(format!("{label}-{n}"));
    std::fs::create_dir_all(&dir).map_err(|source| ProcessError::RunDir {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// A loopback port where nothing listens, held by a socket that is bound and never
/// listens for as long as this lives: connections to it are refused, and no other process
/// can bind it meanwhile.
#[derive(Debug)]
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl ClosedPort {
    pub fn bind() -> Result<ClosedPort, ProcessError> {
        let socket = tokio::net::TcpSocket::new_v4().map_err(ProcessError::Reserve)?;
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .map_err(ProcessError::Reserve)?;
        let addr = socket.local_addr().map_err(ProcessError::Reserve)?;
        Ok(ClosedPort {
            _socket: socket,
            addr,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Waits up to `within` until the podiam daemon `child` has written its
/// `--listen-address-file` at `path`: the addresses it listens on, by flag name (`listen`,
/// `health-listen`). The daemon writes the file once every listener is bound, atomically.
pub async fn listen_addresses(
    child: &mut ChildGuard,
    path: &Path,
    within: Duration,
) -> Result<BTreeMap<String, SocketAddr>, ProcessError> {
    let name = child.name().to_owned();
    let what = format!("{name} to write its addresses to {}", path.display());
    let found = wait_for(within, &what, || {
        let exited = !matches!(child.try_status(), Ok(None));
        let written = std::fs::read_to_string(path)
            .ok()
            .map(|text| podiam_runtime::net::read_address_file(&text))
            .filter(|addresses| !addresses.is_empty());
        async move {
            match written {
                Some(addresses) => Some(Some(addresses)),
                None if exited => Some(None),
                None => None,
            }
        }
    })
    .await?;
    found.ok_or(ProcessError::Exited { name })
}

/// How long a change (a grant, a revocation, a first credential through a review) may take
/// to reach pods in a test: they hold within a second, with slack for a loaded 2-core machine.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `condition` every [`POLL_INTERVAL`] until it is true, or fails after `within`
/// with an error naming `what`.
pub async fn wait_until<F, Fut>(
    within: Duration,
    what: &str,
    mut condition: F,
) -> Result<(), ProcessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(within, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every [`POLL_INTERVAL`] until it returns a value, or fails after `within`
/// with an error naming `what`. The probe runs at least once, even with a zero deadline.
pub async fn wait_for<T, F, Fut>(
    within: Duration,
    what: &str,
    mut probe: F,
) -> Result<T, ProcessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        // A probe that hangs counts against the deadline too.
        if let Ok(Some(value)) = tokio::time::timeout(remaining.max(POLL_INTERVAL), probe()).await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProcessError::Timeout {
                what: what.to_owned(),
                after: within,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A running child process that is stopped and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command` (a `std` or tokio `Command`) with stdin closed and stdout and stderr
    /// appended to `<run_dir>/<name>-<n>.log`. `name` labels logs and errors. Must be called
    /// inside a tokio runtime.
    pub fn spawn(
        name: &str,
        command: impl Into<tokio::process::Command>,
    ) -> Result<Self, ProcessError> {
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let log_path = run_dir()?.join(format!("{safe}-{n}.log"));
        let log_err = |source| ProcessError::LogFile {
            path: log_path.clone(),
            source,
        };
        let stdout = File::create(&log_path).map_err(log_err)?;
        let stderr = stdout.try_clone().map_err(log_err)?;
        let mut command = command.into();
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_owned(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| ProcessError::Exited {
            name: name.to_owned(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            log_path,
            status: None,
        })
    }

    /// The child's name as given to [`ChildGuard::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where the child's stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of the log, for failure messages. Never fails: a read error is
    /// reported inside the returned text.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// Sends `signal` to the child itself (not its group).
    pub fn signal(&mut self, signal: Signal) -> Result<(), ProcessError> {
        if self.try_status()?.is_some() {
            return Err(ProcessError::Exited {
                name: self.name.clone(),
            });
        }
        kill(self.nix_pid(), signal).map_err(|source| ProcessError::Signal {
            name: self.name.clone(),
            signal,
            source,
        })
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
        }
        Ok(self.status)
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit (status 0); an unclean one is
    /// an error carrying the end of the child's log.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<(), ProcessError> {
        self.signal(Signal::SIGTERM)?;
        let status = self.wait_exit(timeout).await?;
        if status.success() {
            return Ok(());
        }
        Err(ProcessError::Unclean {
            name: self.name.clone(),
            status,
            log: self.log_tail(40),
        })
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.status = Some(status);
                Ok(status)
            }
            Ok(Err(source)) => Err(ProcessError::Wait {
                name: self.name.clone(),
                source,
            }),
            Err(_) => Err(ProcessError::Timeout {
                what: format!("{} to exit", self.name),
                after: timeout,
            }),
        }
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    /// Signals the whole group; the child may be gone while its helpers are not.
    fn signal_group(&self, signal: Signal) {
        // ESRCH (nothing left in the group) is the expected outcome once stopped.
        let _ = killpg(self.nix_pid(), signal);
    }

    fn poll_reaped(&mut self, bound: Duration) -> bool {
        let start = Instant::now();
        loop {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            if start.elapsed() >= bound {
                return false;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let running = self.status.is_none() && matches!(self.child.try_wait(), Ok(None));
        if running {
            self.signal_group(Signal::SIGTERM);
            if self.poll_reaped(TERM_GRACE) {
                self.signal_group(Signal::SIGKILL);
                return;
            }
            tracing::warn!(name = %self.name, pid = self.pid, "child ignored SIGTERM; killing");
        }
        self.signal_group(Signal::SIGKILL);
        if running {
            self.poll_reaped(KILL_REAP_BOUND);
        }
    }
}

/// The last `n` lines of the file at `path` (reads at most the last 64 KiB).
pub fn log_tail(path: &Path, n: usize) -> String {
    const MAX_TAIL_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}

/// The repository's root (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}
