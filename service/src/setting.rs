//! The vocabulary every config section is read with: a problem named by its key
//! ([`ConfigError`]), the one way a duration is written ([`parse_duration`]), typed readers
//! over one TOML table ([`Fields`]), and the facts from the process environment that parsing
//! may depend on ([`Env`], gathered once at the edge, before parsing starts).
//!
//! A leaf: it knows no section, no step and no other module of the crate. What a key means
//! and its default belong to the section that reads it (`config`, `ssh::settings`, the
//! steps); the collection of every problem of a file (`config::ConfigErrors`) to `config`.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// One problem with a config, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A duration as the config writes it: `"30s"`, `"5m"`, `"1h30m"`, `"0s"`. The one parser
/// of durations; whether zero or a range is acceptable is the reader's to say.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Reads the keys of one table (`[queue]`, a layer's `ssh = { ... }`, a step), recording
/// each problem with its full key (`queue.wait_time`) and answering a default instead, so
/// that one pass finds every problem. Keys nobody read are reported by [`Fields::finish`].
pub struct Fields<'a> {
    table: Option<&'a toml::Table>,
    prefix: String,
    read: Vec<&'a str>,
    errs: &'a mut Vec<ConfigError>,
}

impl<'a> Fields<'a> {
    /// The keys of `table` (None: the table is absent, every getter answers its default),
    /// named `prefix.KEY` in errors.
    pub fn new(
        table: Option<&'a toml::Table>,
        prefix: impl Into<String>,
        errs: &'a mut Vec<ConfigError>,
    ) -> Fields<'a> {
        Fields {
            table,
            prefix: prefix.into(),
            read: Vec::new(),
            errs,
        }
    }

    /// The full key of `k`, as errors name it.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.prefix)
    }

    /// Records a problem with `k`.
    pub fn error(&mut self, k: &str, message: impl Into<String>) {
        let key = self.key(k);
        self.errs.push(ConfigError::new(key, message));
    }

    /// Where problems go, for a nested parser that names its own keys.
    pub fn errors(&mut self) -> &mut Vec<ConfigError> {
        self.errs
    }

    /// The raw value of `k`, marking it as read.
    pub fn value(&mut self, k: &'a str) -> Option<&'a toml::Value> {
        self.read.push(k);
        self.table?.get(k)
    }

    /// The value of a key that must be there; `missing` says what it is for when it is not.
    pub fn required(&mut self, k: &'a str, missing: &str) -> Option<&'a toml::Value> {
        let v = self.value(k);
        if v.is_none() {
            self.error(k, missing);
        }
        v
    }

    /// `k` read by `f`, which says in words what is wrong; None when absent or wrong.
    pub fn with<T>(
        &mut self,
        k: &'a str,
        f: impl FnOnce(&'a toml::Value) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.value(k)?;
        f(v).map_err(|m| self.error(k, m)).ok()
    }

    /// A string (possibly empty).
    pub fn string(&mut self, k: &'a str) -> Option<&'a str> {
        self.with(k, |v| {
            v.as_str().ok_or_else(|| "must be a string".to_string())
        })
    }

    /// A non-empty string.
    pub fn non_empty(&mut self, k: &'a str) -> Option<&'a str> {
        self.with(k, |v| match v.as_str() {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err("must be a non-empty string".to_string()),
        })
    }

    /// A path (a non-empty string).
    pub fn path(&mut self, k: &'a str) -> Option<PathBuf> {
        self.with(k, |v| match v.as_str() {
            Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
            _ => Err("must be a path".to_string()),
        })
    }

    /// An integer within `range`, else `default`.
    pub fn int(&mut self, k: &'a str, range: RangeInclusive<i64>, default: i64) -> i64 {
        self.with(k, |v| match v.as_integer() {
            Some(n) if range.contains(&n) => Ok(n),
            Some(n) => Err(format!(
                "{n} is out of range {}..={}",
                range.start(),
                range.end()
            )),
            None => Err(format!(
                "must be a number {}..={}",
                range.start(),
                range.end()
            )),
        })
        .unwrap_or(default)
    }

    /// A duration of a section setting (zero allowed), else `default`.
    pub fn duration(&mut self, k: &'a str, default: Duration) -> Duration {
        const EXAMPLES: &str = "write e.g. \"30s\", \"5m\", \"1h\"";
        self.with(k, |v| match v.as_str() {
            Some(s) => {
                parse_duration(s).map_err(|e| format!("{s:?} is not a duration ({e}); {EXAMPLES}"))
            }
            None => Err(format!("{v} is not a duration; {EXAMPLES}")),
        })
        .unwrap_or(default)
    }

    /// A timeout: a duration above zero, the error naming `example` (`"30s"`).
    pub fn timeout(&mut self, k: &'a str, example: &str) -> Option<Duration> {
        self.with(k, |v| match v.as_str().map(parse_duration) {
            Some(Ok(d)) if !d.is_zero() => Ok(d),
            _ => Err(format!("must be a duration such as {example:?}")),
        })
    }

    /// Reports every key nobody read as unknown in `section` (`[queue]`), naming the known ones.
    pub fn finish_section(self, section: &str) {
        let message = format!(
            "unknown key in {section}; expected one of: {}",
            self.read.join(", ")
        );
        self.finish(&message)
    }

    /// Reports every key nobody read with the message `unknown` ("unknown key in \[ssh\]").
    pub fn finish(self, unknown: &str) {
        let Some(t) = self.table else { return };
        for k in t.keys() {
            if !self.read.contains(&k.as_str()) {
                self.errs
                    .push(ConfigError::new(format!("{}.{k}", self.prefix), unknown));
            }
        }
    }
}

/// A value as an error message quotes it: a string in quotes (`"forever"`), others as TOML.
pub fn quoted(v: &toml::Value) -> String {
    match v.as_str() {
        Some(s) => format!("{s:?}"),
        None => v.to_string(),
    }
}

/// What parsing may take from the process environment, gathered once before it starts (as
/// ripgrep gathers the facts its typed arguments depend on), so that validating a config
/// never reads the environment halfway and tests hand in the facts they mean.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`): the default home of `state.db`.
    pub state_directory: Option<PathBuf>,
    /// `$RUNTIME_DIRECTORY` (systemd `RuntimeDirectory=`): control sockets, ssh_config, vault files.
    pub runtime_directory: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`): the ssh key and vault password.
    pub credentials_directory: Option<PathBuf>,
    /// `$PROVISION_CONFIG`: the config file when `--config` is not given.
    pub config_path: Option<PathBuf>,
}

impl Env {
    /// The facts as this process's environment states them now.
    pub fn from_process() -> Env {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        Env {
            state_directory: systemd_directory(var("STATE_DIRECTORY")),
            runtime_directory: systemd_directory(var("RUNTIME_DIRECTORY")),
            credentials_directory: var("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            config_path: var("PROVISION_CONFIG").map(PathBuf::from),
        }
    }
}

/// The first directory of a systemd `*_DIRECTORY` value (colon-separated when the unit
/// names several).
fn systemd_directory(value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let first = value?.to_string_lossy().split(':').next()?.to_string();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn every_getter_names_the_full_key_and_answers_its_default() {
        let t = table("n = 0\nwait = \"forever\"\nt = \"0s\"\np = \"\"\nextra = 1\n");
        let mut errs = Vec::new();
        let mut f = Fields::new(Some(&t), "queue", &mut errs);
        assert_eq!(f.int("n", 1..=10, 5), 5);
        assert_eq!(
            f.duration("wait", Duration::from_secs(20)),
            Duration::from_secs(20)
        );
        assert_eq!(f.timeout("t", "30s"), None);
        assert_eq!(f.path("p"), None);
        assert_eq!(f.string("absent"), None);
        f.finish("unknown key in [queue]");
        let got: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let wait = format!(
            "queue.wait: \"forever\" is not a duration ({}); write e.g. \"30s\", \"5m\", \"1h\"",
            parse_duration("forever").unwrap_err()
        );
        assert_eq!(
            got,
            [
                "queue.n: 0 is out of range 1..=10",
                wait.as_str(),
                "queue.t: must be a duration such as \"30s\"",
                "queue.p: must be a path",
                "queue.extra: unknown key in [queue]",
            ]
        );
    }

    #[test]
    fn an_absent_table_answers_defaults_without_problems() {
        let mut errs = Vec::new();
        let mut f = Fields::new(None, "daemon", &mut errs);
        assert_eq!(
            f.duration("shutdown_grace", Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(f.int("n", 1..=3, 2), 2);
        f.finish("unknown key in [daemon]");
        assert!(errs.is_empty());
    }

    #[test]
    fn durations_read_the_way_the_docs_write_them() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn systemd_directories_take_the_first_entry() {
        let d = |s: &str| systemd_directory(Some(s.into()));
        assert_eq!(
            d("/var/lib/provision:/var/lib/other"),
            Some(PathBuf::from("/var/lib/provision"))
        );
        assert_eq!(d(":/x"), None);
        assert_eq!(systemd_directory(None), None);
    }
}
