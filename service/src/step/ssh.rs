//! The `ssh` step: commands, or a local script, run on the instance over SSH.
//!
//! ```toml
//! { ssh = ["systemctl restart app", "/opt/app/check --role {metadata.role}"] }
//! { ssh = { script = "scripts/drain.sh" }, timeout = "5m" }
//! ```
//!
//! The instance is reached as for every SSH step ([`crate::ssh`]), then each command runs
//! in the login shell of `ssh.user`, in order, through one connection (the `openssh`
//! crate); a script is sent on stdin to `sh -s`. A non-zero exit fails the step with the
//! command's exit status and the end of its stderr and stdout. Commands are templates;
//! metadata only reaches them through the layer's declared vars.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tracing::{info, warn};

use crate::setting::ConfigError;
use crate::template::{Context, Template, Vars};

use super::{require_declared, tail, StepContext, StepError, StepOutput};
use crate::output::{drain, HeadTail, LogSink};

const EXCERPT: usize = 800;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Ssh {
    work: Work,
    /// Bounds the commands once the instance is reached (the step's `timeout`).
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
enum Work {
    Commands(Vec<Template>),
    /// A local file, relative to the playbook directory's parent when relative.
    Script(PathBuf),
}

impl Ssh {
    pub fn parse(value: &toml::Value, key: &str, vars: &Vars) -> Result<Ssh, Vec<ConfigError>> {
        let usage = "must be a list of commands, or { commands = [...] } or { script = \"PATH\" }";
        let commands = |list: &[toml::Value], key: &str| -> Result<Work, Vec<ConfigError>> {
            let mut errs = Vec::new();
            let mut out = Vec::new();
            if list.is_empty() {
                errs.push(ConfigError::new(key, "no commands"));
            }
            for (i, v) in list.iter().enumerate() {
                let ck = format!("{key}[{i}]");
                match v.as_str().map(Template::parse) {
                    Some(Ok(t)) => {
                        errs.extend(require_declared(&t, &ck, vars));
                        out.push(t);
                    }
                    Some(Err(e)) => errs.push(ConfigError::new(ck, e.to_string())),
                    None => errs.push(ConfigError::new(ck, "must be a string")),
                }
            }
            if errs.is_empty() {
                Ok(Work::Commands(out))
            } else {
                Err(errs)
            }
        };
        let work = match value {
            toml::Value::Array(a) => commands(a, key),
            toml::Value::Table(t) => match (t.get("commands"), t.get("script"), t.len()) {
                (Some(toml::Value::Array(a)), None, 1) => commands(a, &format!("{key}.commands")),
                (None, Some(toml::Value::String(s)), 1) if !s.is_empty() => {
                    Ok(Work::Script(PathBuf::from(s)))
                }
                _ => Err(vec![ConfigError::new(key, usage)]),
            },
            _ => Err(vec![ConfigError::new(key, usage)]),
        }?;
        Ok(Ssh {
            work,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn describe(&self) -> String {
        match &self.work {
            Work::Commands(c) => format!(
                "ssh {}",
                c.iter()
                    .map(|t| format!("{:?}", t.source()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Work::Script(p) => format!("ssh script {}", p.display()),
        }
    }

    pub fn preview(&self, ctx: &Context<'_>) -> Result<String, StepError> {
        match &self.work {
            Work::Commands(c) => {
                let cmds = c
                    .iter()
                    .map(|t| t.render(ctx).map_err(|e| StepError::Input(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(format!("ssh {cmds:?}"))
            }
            Work::Script(p) => Ok(format!("ssh script {} (sh -s)", p.display())),
        }
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        // Render first: bad input fails before anything connects.
        let work = self.work(ctx).await?;
        let remote =
            ctx.shared.remote.as_ref().ok_or_else(|| {
                StepError::NotReady("SSH is not available in this mode".to_string())
            })?;
        let budget = remote.settings().output_max_bytes;
        let (target, session) = ctx.reach(remote).await?;
        // The whole output, bounded, goes to the step's log; the history keeps head and tail.
        let log = remote.logs().open(
            &format!("{}-ssh", target.id),
            &format!(
                "instance: {}\naddress: {}\ncommands: {}\n",
                target.id,
                target.address,
                work.len()
            ),
        );
        let mut details = Vec::new();
        let mut failure = None;
        let commands = async {
            for (cmd, stdin) in &work {
                ctx.note(format!("running {cmd:?} on {}", target.address));
                match run_one(&session, cmd, stdin.as_deref(), budget, &log).await {
                    Ok(text) => details.push(text),
                    Err(text) => {
                        failure = Some(text);
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(self.timeout, commands).await.is_err() {
            failure = Some(format!(
                "{}the commands did not finish within {} (the step's timeout); the session was closed",
                details.last().map(|d| format!("{d}\n")).unwrap_or_default(),
                humantime::format_duration(self.timeout)
            ));
        }
        if let Err(e) = session.close().await {
            warn!(error = %e, "closing the SSH session");
        }
        match failure {
            Some(f) => Err(StepError::Remote(f)),
            None => Ok(StepOutput {
                detail: details.join("\n"),
            }),
        }
    }

    /// The commands to run, rendered, each with what goes to its stdin (a script's body).
    async fn work(
        &self,
        ctx: &StepContext<'_>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, StepError> {
        match &self.work {
            Work::Commands(c) => c
                .iter()
                .map(|t| {
                    t.render(&ctx.template)
                        .map(|cmd| (cmd, None))
                        .map_err(|e| StepError::Input(e.to_string()))
                })
                .collect(),
            Work::Script(p) => {
                let path = match (&ctx.shared.ansible, p.is_relative()) {
                    (Some(r), true) => r
                        .settings
                        .playbook_dir
                        .parent()
                        .map(|d| d.join(p))
                        .unwrap_or_else(|| p.clone()),
                    _ => p.clone(),
                };
                let body = tokio::fs::read(&path).await.map_err(|e| {
                    StepError::Input(format!("cannot read script {}: {e}", path.display()))
                })?;
                Ok(vec![("sh -s".to_string(), Some(body))])
            }
        }
    }
}

/// One command over the session: its exit code and output for the history, as Ok when it
/// succeeded and Err when it failed (or could not run). Its stdin (a script) is written
/// while its output is read, and of its output only head and tail (`budget` bytes each for
/// stdout and stderr) are ever held.
async fn run_one(
    session: &openssh::Session,
    cmd: &str,
    stdin: Option<&[u8]>,
    budget: usize,
    (log_path, log): &(String, Mutex<LogSink>),
) -> Result<String, String> {
    log.lock().unwrap().note(&format!("\n--- $ {cmd}\n"));
    let failed = |e: openssh::Error| format!("$ {cmd}: {}", crate::ssh::ssh_error_text(&e));
    let mut c = session.raw_command(cmd);
    c.stdout(openssh::Stdio::piped())
        .stderr(openssh::Stdio::piped())
        .stdin(match stdin {
            Some(_) => openssh::Stdio::piped(),
            None => openssh::Stdio::null(),
        });
    let mut child = c.spawn().await.map_err(failed)?;
    let (input, out_pipe, err_pipe) = (
        child.stdin().take(),
        child.stdout().take(),
        child.stderr().take(),
    );
    let (mut out, mut err) = (HeadTail::new(budget), HeadTail::new(budget));
    let feed = async {
        use tokio::io::AsyncWriteExt as _;
        if let (Some(mut w), Some(body)) = (input, stdin) {
            // A command that stops reading early is not an error of ours: its exit says.
            let _ = w.write_all(body).await;
            let _ = w.shutdown().await;
        }
    };
    let read_out = async {
        if let Some(r) = out_pipe {
            let _ = drain(r, &mut out, Some(log)).await;
        }
    };
    let read_err = async {
        if let Some(r) = err_pipe {
            let _ = drain(r, &mut err, Some(log)).await;
        }
    };
    tokio::join!(feed, read_out, read_err);
    let status = child.wait().await.map_err(failed)?;
    let code = status.code();
    let exit = code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "by signal".into());
    log.lock().unwrap().note(&format!("\n--- exit {exit}\n"));
    let text = format!(
        "$ {cmd} -> exit {exit}{}\n{}{}",
        match (out.total() + err.total(), out.omitted() + err.omitted()) {
            (0, _) => String::new(),
            (n, 0) => format!(" ({n} bytes of output)"),
            (n, _) =>
                format!(" ({n} bytes of output; all of it, up to ssh.log_max_bytes, in {log_path})"),
        },
        lines("", &out),
        lines("stderr: ", &err)
    );
    info!(command = %cmd, exit = ?code, stdout_bytes = out.total(), stderr_bytes = err.total(), "ssh command finished");
    if status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// An output excerpt (its end) as its own line(s), or nothing.
fn lines(label: &str, kept: &HeadTail) -> String {
    match tail(&kept.text(), EXCERPT) {
        e if e.is_empty() => e,
        e => format!("{label}{e}\n"),
    }
}
