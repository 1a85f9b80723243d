//! Reaching an instance: waiting until it is running, has the address `ssh.address` names,
//! has published its host keys (console mode), accepts an SSH connection with a verified
//! key and (`ssh.wait_for_cloud_init`) has finished cloud-init; all with backoff until
//! `ssh.ready_timeout`.
//!
//! [`Remote::reach`] leaves an open session (the `ssh` step runs its commands through it);
//! [`Remote::probe`], for a step that makes its own connections (`ansible`), logs in and
//! waits for cloud-init with one plain `ssh` process an attempt, whose login stays open as a
//! control master for the step's own clients ([`super::mux`]).
//!
//! Owns the waits and their words (`i-0… was not reachable over SSH within 5m
//! (ssh.ready_timeout): …`). Its inputs are narrow ([`Reach`]): the instance, the layer's
//! overrides, the batched lookup, the EC2 service and a note for a watching operator; so it
//! knows nothing of steps ([`ReachError`] becomes a step error in `step`). Not here: the
//! ssh options ([`super::Remote`]), the key files ([`super::known_hosts`]).

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;

use crate::aws::{AwsError, InstanceInfo, InstanceState, Instances};
use crate::batch::Batcher;
use crate::event::InstanceId;
use crate::poll::{until, Pace};

use super::host_keys::{console_host_keys, key_refused};
use super::settings::{AddressMode, HostKeyCheck, LayerSsh};
use super::{ssh_error_text, Mux, Remote};

const WAIT_FIRST: Duration = Duration::from_secs(1);
const WAIT_MAX: Duration = Duration::from_secs(10);
const CONSOLE_WAIT_FIRST: Duration = Duration::from_secs(2);
const CONSOLE_WAIT_MAX: Duration = Duration::from_secs(15);
/// Run by the remote shell; fixed text, nothing from an event. No cloud-init: ready.
const CLOUD_INIT_WAIT: &str = "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait; else echo 'status: cloud-init not installed'; fi";

/// An instance ready for SSH: where to connect and as whom, and what DescribeInstances
/// said of it when it was found running with its address (the batched lookup's answer:
/// playbooks' inventory reads its tags and facts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: InstanceId,
    pub address: String,
    pub port: u16,
    pub user: String,
    pub described: InstanceInfo,
    /// The control socket of the verified login [`Remote::probe`] left open, for the
    /// step's own ssh clients (see [`super::mux`]).
    pub control_path: Option<std::path::PathBuf>,
}

/// What reaching one instance needs to know.
pub struct Reach<'a> {
    pub id: &'a InstanceId,
    /// The layer's overrides of `[ssh]` user and port.
    pub layer: &'a LayerSsh,
    /// DescribeInstances, batched with every other instance asked about at once.
    pub lookup: &'a Batcher<InstanceId, InstanceInfo>,
    /// EC2, for the console output.
    pub instances: &'a dyn Instances,
    /// Tells a watching operator what is waited for (`provision <instance-id>`).
    pub note: &'a (dyn Fn(String) + Send + Sync),
}

/// Why an instance could not be reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReachError {
    /// Not ready by the deadline, or never going to be (stopped, terminated).
    #[error("{0}")]
    NotReady(String),
    /// The server presented a key other than the verified ones.
    #[error("{0}")]
    HostKeyRefused(String),
    /// AWS refused a call for good.
    #[error(transparent)]
    Aws(#[from] AwsError),
}

impl Remote {
    /// Waits until the instance is running, has an address, its host keys are known (console
    /// mode) and SSH accepts a connection; returns the open session. Fails at once when the
    /// server presents a key other than the verified ones.
    pub async fn reach(&self, to: &Reach<'_>) -> Result<(Target, openssh::Session), ReachError> {
        let deadline = Instant::now() + self.settings.ready_timeout;
        let target = self.located(to, deadline).await?;
        let session = self
            .ssh_accepts(to, &target, deadline)
            .await?
            .map_err(|w| self.late(to, &w))?;
        if self.settings.wait_for_cloud_init {
            self.cloud_init_done(to, &session, deadline)
                .await
                .map_err(|w| self.cloud_init_late(to, &w))?;
        }
        Ok((target, session))
    }

    /// [`Remote::reach`] for a step that makes its own connections (`ansible`): the same
    /// waits and checks, but the login and the wait for cloud-init are ONE `ssh` process
    /// an attempt, and the login stays open in the background as a control master (its
    /// socket in [`Target::control_path`]) until the returned [`Mux`] is dropped: the
    /// step's clients use it instead of logging in again.
    pub async fn probe(&self, to: &Reach<'_>) -> Result<(Target, Option<Mux>), ReachError> {
        let deadline = Instant::now() + self.settings.ready_timeout;
        let target = self.located(to, deadline).await?;
        let config = self.instance_config(&target).map_err(|e| {
            ReachError::NotReady(format!(
                "cannot write the ssh configuration for {}: {e}",
                target.id
            ))
        })?;
        let (target_ref, config) = (&target, config.as_path());
        let pace = Pace::doubling(deadline, WAIT_FIRST, WAIT_MAX);
        let done = until(pace, move || async move {
            (to.note)(format!(
                "waiting for SSH on {}:{}",
                target_ref.address, target_ref.port
            ));
            match self.probe_once(target_ref, config, deadline).await {
                Probe::Ready(mux) => ControlFlow::Break(Ok(mux)),
                Probe::Refused(why) => ControlFlow::Break(Err(ReachError::HostKeyRefused(why))),
                Probe::CloudInit(w) => ControlFlow::Break(Err(self.cloud_init_late(to, &w))),
                Probe::Wait(last) => ControlFlow::Continue(last),
            }
        })
        .await;
        let mux = flip(done)?.map_err(|w| self.late(to, &w))?;
        let mut target = target;
        target.control_path = mux.as_ref().map(|m| m.path().to_path_buf());
        Ok((target, mux))
    }

    /// One login with a verified key running the cloud-init wait (or `true`), left open as
    /// a control master when it succeeds (a failed attempt's master is closed).
    async fn probe_once(&self, target: &Target, config: &Path, deadline: Instant) -> Probe {
        let left = deadline.saturating_duration_since(Instant::now());
        let connect = self
            .settings
            .connect_timeout
            .min(left)
            .max(Duration::from_secs(1));
        let mux = self.mux_for(target);
        let mut c = self.ssh_command(target, config, connect, mux.as_ref());
        c.arg(if self.settings.wait_for_cloud_init {
            CLOUD_INIT_WAIT
        } else {
            "true"
        });
        let out = match tokio::time::timeout(left + Duration::from_secs(5), c.output()).await {
            Err(_) if self.settings.wait_for_cloud_init => {
                return Probe::CloudInit("cloud-init status --wait was still waiting".into())
            }
            Err(_) => return Probe::Wait(format!("{}:{}: no answer", target.address, target.port)),
            Ok(Err(e)) => return Probe::Wait(format!("cannot run ssh: {e}")),
            Ok(Ok(out)) => out,
        };
        if out.status.code() == Some(255) {
            let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if let Some(why) = key_refused(&self.settings.host_key_check, &text, target) {
                return Probe::Refused(why);
            }
            return Probe::Wait(format!("{}:{}: {text}", target.address, target.port));
        }
        info!(address = %target.address, port = target.port, user = %target.user, "SSH is up");
        // A master that could not start (ssh said why on stderr) shares nothing: the
        // clients log in themselves.
        let mux = mux.filter(Mux::is_up);
        if !self.settings.wait_for_cloud_init {
            return Probe::Ready(mux);
        }
        match cloud_init_verdict(out.status.code(), &String::from_utf8_lossy(&out.stdout)) {
            Ok(()) => Probe::Ready(mux),
            Err(w) => Probe::CloudInit(w),
        }
    }

    /// Running, with an address and (console mode) its host keys known: where to connect.
    async fn located(&self, to: &Reach<'_>, deadline: Instant) -> Result<Target, ReachError> {
        let (address, described) = self
            .running_address(to, deadline)
            .await?
            .map_err(|w| self.late(to, &w))?;
        let target = Target {
            id: to.id.clone(),
            address,
            described,
            control_path: None,
            port: to.layer.port.unwrap_or(self.settings.port),
            user: to
                .layer
                .user
                .clone()
                .unwrap_or_else(|| self.settings.user.clone()),
        };
        if self.settings.host_key_check == HostKeyCheck::Console {
            self.console_keys(to, &target, deadline).await?.map_err(|last| {
                self.late(to, &format!(
                    "{last} (cloud-init prints the keys at first boot; without them the host cannot be verified)"
                ))
            })?;
        }
        Ok(target)
    }

    fn late(&self, to: &Reach<'_>, last: &str) -> ReachError {
        ReachError::NotReady(format!(
            "{} was not reachable over SSH within {} (ssh.ready_timeout): {last}",
            to.id,
            humantime::format_duration(self.settings.ready_timeout)
        ))
    }

    fn cloud_init_late(&self, to: &Reach<'_>, why: &str) -> ReachError {
        ReachError::NotReady(format!(
            "{}: cloud-init had not finished within {} (ssh.ready_timeout; ssh.wait_for_cloud_init = false skips the wait): {why}",
            to.id,
            humantime::format_duration(self.settings.ready_timeout)
        ))
    }

    /// Waits until cloud-init has finished on the instance (`cloud-init status --wait`), so
    /// that steps never race its boot configuration. An instance without cloud-init is
    /// ready; one whose cloud-init ended in error is not, and never will be. `Err`: why not
    /// ready by the deadline.
    async fn cloud_init_done(
        &self,
        to: &Reach<'_>,
        session: &openssh::Session,
        deadline: Instant,
    ) -> Result<(), String> {
        (to.note)("waiting for cloud-init to finish (cloud-init status --wait)".to_string());
        let mut cmd = session.raw_command(CLOUD_INIT_WAIT);
        let wait = cmd.output();
        let left = deadline.saturating_duration_since(Instant::now());
        let out = match tokio::time::timeout(left, wait).await {
            Err(_) => return Err("cloud-init status --wait was still waiting".into()),
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot run cloud-init status: {}",
                    ssh_error_text(&e)
                ))
            }
            Ok(Ok(out)) => out,
        };
        cloud_init_verdict(out.status.code(), &String::from_utf8_lossy(&out.stdout))
    }

    /// Running, with an address (and what DescribeInstances said). Outer error: give up now; inner: the last reason to wait.
    async fn running_address(
        &self,
        to: &Reach<'_>,
        deadline: Instant,
    ) -> Result<Result<(String, InstanceInfo), String>, ReachError> {
        let pace = Pace::doubling(deadline, WAIT_FIRST, WAIT_MAX);
        let found = until(pace, move || async move {
            let last = match to.lookup.submit(to.id.clone()).await {
                Ok(info) => match &info.state {
                    InstanceState::Running => match self.address_of(&info) {
                        Some(a) => return ControlFlow::Break(Ok((a, info))),
                        None => format!("running, but it has no {}", self.address_name()),
                    },
                    s @ (InstanceState::ShuttingDown
                    | InstanceState::Terminated
                    | InstanceState::Stopping
                    | InstanceState::Stopped) => {
                        return ControlFlow::Break(Err(ReachError::NotReady(format!(
                            "{} is {s}; nothing to connect to",
                            to.id
                        ))))
                    }
                    s => format!("instance state is {s}"),
                },
                Err(e) => e.to_string(),
            };
            (to.note)(format!("waiting for the instance: {last}"));
            ControlFlow::Continue(last)
        })
        .await;
        flip(found)
    }

    /// Reads the console until its first host key block appears, then writes the instance's
    /// known_hosts file. Already written (an earlier step or run): nothing to do.
    async fn console_keys(
        &self,
        to: &Reach<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Result<(), String>, ReachError> {
        if self.known_hosts.has_keys(&target.id) {
            return Ok(Ok(()));
        }
        let pace = Pace::doubling(deadline, CONSOLE_WAIT_FIRST, CONSOLE_WAIT_MAX);
        let written = until(pace, move || async move {
            (to.note)("waiting for the host keys in the console output".to_string());
            let why = match to.instances.console_output(&target.id).await {
                Ok(Some(text)) => match console_host_keys(&text) {
                    Some(keys) if !keys.is_empty() => {
                        return ControlFlow::Break(self.keep_console_keys(target, &keys))
                    }
                    Some(_) => "the console's host key block lists no usable key".to_string(),
                    None => "no SSH HOST KEY KEYS block in the console output yet".to_string(),
                },
                Ok(None) => "the console output is empty so far".to_string(),
                Err(e) if e.retryable() => e.to_string(),
                Err(e) => return ControlFlow::Break(Err(ReachError::Aws(e))),
            };
            ControlFlow::Continue(why)
        })
        .await;
        flip(written)
    }

    fn keep_console_keys(&self, target: &Target, keys: &[String]) -> Result<(), ReachError> {
        self.known_hosts.write(target, keys).map_err(|e| {
            let file = self.known_hosts.file(&target.id);
            ReachError::NotReady(format!("cannot write {}: {e}", file.display()))
        })?;
        info!(keys = keys.len(), "host keys taken from the console output");
        Ok(())
    }

    /// SSH accepts a connection with a verified key.
    async fn ssh_accepts(
        &self,
        to: &Reach<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Result<openssh::Session, String>, ReachError> {
        let config = self.instance_config(target).map_err(|e| {
            ReachError::NotReady(format!(
                "cannot write the ssh configuration for {}: {e}",
                target.id
            ))
        })?;
        let config = config.as_path();
        let pace = Pace::doubling(deadline, WAIT_FIRST, WAIT_MAX);
        let connected = until(pace, move || async move {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = self.settings.connect_timeout.min(left);
            (to.note)(format!(
                "waiting for SSH on {}:{}",
                target.address, target.port
            ));
            let attempt = tokio::time::timeout(
                timeout + Duration::from_secs(5),
                self.builder(target, config, timeout)
                    .connect(&target.address),
            )
            .await;
            let last = match attempt {
                Ok(Ok(session)) => {
                    info!(address = %target.address, port = target.port, user = %target.user, "SSH is up");
                    return ControlFlow::Break(Ok(session));
                }
                Ok(Err(e)) => {
                    let text = ssh_error_text(&e);
                    if let Some(why) = key_refused(&self.settings.host_key_check, &text, target) {
                        return ControlFlow::Break(Err(ReachError::HostKeyRefused(why)));
                    }
                    format!("{}:{}: {text}", target.address, target.port)
                }
                Err(_) => format!(
                    "{}:{}: connection attempt timed out",
                    target.address, target.port
                ),
            };
            ControlFlow::Continue(last)
        })
        .await;
        flip(connected)
    }

    fn address_of(&self, info: &InstanceInfo) -> Option<String> {
        match &self.settings.address {
            AddressMode::PrivateIp => info.private_ip.clone(),
            AddressMode::PublicIp => info.public_ip.clone(),
            AddressMode::PrivateDns => info.private_dns.clone(),
            AddressMode::PublicDns => info.public_dns.clone(),
            AddressMode::Tag(k) => info.tags.get(k).cloned(),
        }
        .filter(|a| {
            // Tags are instance-writable data: only a plain host name or address passes.
            !a.is_empty()
                && !a.starts_with('-')
                && a.len() <= 253
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
    }

    fn address_name(&self) -> String {
        match &self.settings.address {
            AddressMode::PrivateIp => "private IP".into(),
            AddressMode::PublicIp => "public IP".into(),
            AddressMode::PrivateDns => "private DNS name".into(),
            AddressMode::PublicDns => "public DNS name".into(),
            AddressMode::Tag(k) => format!("address in tag {k:?}"),
        }
    }
}

/// One probe's outcome.
enum Probe {
    /// With the login kept open, when it could be.
    Ready(Option<Mux>),
    Refused(String),
    /// Logged in, and cloud-init ended in error or is still running at the deadline.
    CloudInit(String),
    /// Not yet: the last reason.
    Wait(String),
}

/// `cloud-init status --wait`'s exit status and output as a verdict: finished (0, or 2:
/// with recoverable errors, "degraded done"), or why not.
fn cloud_init_verdict(code: Option<i32>, said: &str) -> Result<(), String> {
    let last = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    match code {
        Some(0 | 2) => {
            info!(cloud_init = %last, "cloud-init has finished");
            Ok(())
        }
        _ => Err(format!(
            "cloud-init ended in error ({last}; exit {}): the instance's own boot configuration failed; see /var/log/cloud-init-output.log on it",
            code.map(|c| c.to_string()).unwrap_or_else(|| "signal".into())
        )),
    }
}

/// A wait's outcome, with "give up now" outside and "still waiting at the deadline" inside.
fn flip<T, W>(r: Result<Result<T, ReachError>, W>) -> Result<Result<T, W>, ReachError> {
    match r {
        Ok(Ok(t)) => Ok(Ok(t)),
        Ok(Err(e)) => Err(e),
        Err(w) => Ok(Err(w)),
    }
}
