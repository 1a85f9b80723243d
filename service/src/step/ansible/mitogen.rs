//! Finding Mitogen for Ansible: the directory of its strategy plugins (`mitogen_linear`),
//! in the Python that runs `ansible-playbook`, so that nobody edits an `ansible.cfg`.
//!
//! `ansible-playbook` is a Python script; its `#!` line names its interpreter. That
//! interpreter is asked where the `ansible_mitogen` package is (without importing it), and
//! the runner passes `<package>/plugins/strategy` to each run as `ANSIBLE_STRATEGY_PLUGINS`.
//!
//! Owns the discovery; not the choice of strategy (settings) nor the run's environment
//! (runner).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Where Mitogen for Ansible was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mitogen {
    /// `…/ansible_mitogen/plugins/strategy`.
    pub strategy_dir: PathBuf,
    /// The installed `mitogen` distribution's version, for the log.
    pub version: String,
}

/// The pinned version scripts/setup installs and the README names.
pub const PINNED: &str = "0.3.54";

const PROBE: &str = "import importlib.util, importlib.metadata, os\n\
spec = importlib.util.find_spec('ansible_mitogen')\n\
if spec is None or not spec.origin:\n    raise SystemExit('no module named ansible_mitogen')\n\
print(os.path.join(os.path.dirname(spec.origin), 'plugins', 'strategy'))\n\
try:\n    print(importlib.metadata.version('mitogen'))\n\
except Exception:\n    print('unknown')\n";

/// Finds Mitogen for Ansible beside `program` (ansible-playbook: a path, or a name searched
/// in PATH). The error says what to install.
pub fn find(program: &Path) -> Result<Mitogen, String> {
    let hint = format!(
        "ansible.strategy = \"mitogen\" (the default) needs Mitogen for Ansible in the Python that runs {}: `<that python> -m pip install mitogen=={PINNED}`; or set ansible.strategy = \"linear\"",
        program.display()
    );
    let script = resolve(program)
        .ok_or_else(|| format!("{} not found in PATH; {hint}", program.display()))?;
    let python = interpreter(&script).ok_or_else(|| {
        format!(
            "{} does not start with a #! line naming its Python; {hint}",
            script.display()
        )
    })?;
    let mut c = std::process::Command::new(&python[0]);
    c.args(&python[1..])
        .args(["-I", "-c", PROBE])
        .env_clear()
        .env("PATH", path_var())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = output_within(c, Duration::from_secs(30))
        .map_err(|e| format!("cannot run {}: {e}; {hint}", python.join(" ")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(dir), Some(version)) = (lines.next(), lines.next()) else {
        return Err(format!(
            "{}: {}; {hint}",
            python.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    };
    let strategy_dir = PathBuf::from(dir);
    if !out.status.success() || !strategy_dir.join("mitogen_linear.py").is_file() {
        return Err(format!(
            "{} has no mitogen_linear strategy plugin; {hint}",
            strategy_dir.display()
        ));
    }
    Ok(Mitogen {
        strategy_dir,
        version: version.to_string(),
    })
}

fn path_var() -> std::ffi::OsString {
    std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// `program` itself when it is a path, else the first match in PATH.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::split_paths(&path_var())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// The interpreter of a script's `#!` line, as argv (`/usr/bin/env python3` stays two words).
fn interpreter(script: &Path) -> Option<Vec<String>> {
    use std::io::Read as _;
    let mut head = [0u8; 512];
    let n = std::fs::File::open(script).ok()?.read(&mut head).ok()?;
    let text = std::str::from_utf8(&head[..n]).ok()?;
    let line = text.strip_prefix("#!")?.lines().next()?;
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    (!words.is_empty()).then_some(words)
}

/// Runs a command to its end, killed past `limit`.
fn output_within(
    mut c: std::process::Command,
    limit: Duration,
) -> std::io::Result<std::process::Output> {
    let child = c.spawn()?;
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            // SAFETY: kill(2) on the child this function started, still unreaped.
            unsafe {
                libc::kill(id as i32, libc::SIGKILL);
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_comes_from_the_shebang_line() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "#!/opt/ansible/bin/python3\nimport sys\n").unwrap();
        assert_eq!(
            interpreter(&a),
            Some(vec!["/opt/ansible/bin/python3".to_string()])
        );
        let b = dir.path().join("b");
        std::fs::write(&b, "#!/usr/bin/env python3\n").unwrap();
        assert_eq!(
            interpreter(&b),
            Some(vec!["/usr/bin/env".to_string(), "python3".to_string()])
        );
        let c = dir.path().join("c");
        std::fs::write(&c, "\x7fELF").unwrap();
        assert_eq!(interpreter(&c), None);
    }

    #[test]
    fn a_missing_program_says_what_to_install_or_set() {
        let e = find(Path::new("/nonexistent/ansible-playbook")).unwrap_err();
        assert!(
            e.contains("mitogen==") && e.contains("ansible.strategy = \"linear\""),
            "{e}"
        );
    }
}
