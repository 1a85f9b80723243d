//! Layers: which layer an event belongs to, and what it runs.
//!
//! Owns the `[layers.NAME]` tables (a [`Layer`] is its matcher, its declared metadata vars,
//! its failure result, its ssh overrides and its step lists: launch and terminate, and for
//! warm pools entering, leaving and returning to the pool) and routing: an event belongs to
//! the first layer whose [`Matcher`] accepts it. Which list an event runs is its
//! [`Phase`]'s. What a step does is the
//! step's business ([`crate::step`]); filling `{field}` templates is [`crate::template`]'s.

use std::collections::BTreeMap;

use crate::event::{LifecycleEvent, Phase};
use crate::outcome::HookResult;
use crate::setting::{ConfigError, Fields};
use crate::ssh::LayerSsh;
use crate::step::{self, Step};
use crate::template::{Pattern, Vars};

#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub matcher: Matcher,
    /// Metadata keys the steps may use, with the pattern each value must match.
    pub vars: Vars,
    pub on_failure: HookResult,
    /// Overrides of `[ssh]` for this layer's instances.
    pub ssh: LayerSsh,
    pub launch: Vec<Step>,
    pub terminate: Vec<Step>,
    /// Entering the warm pool (the one-time setup; the instance stops afterwards). None:
    /// the launch steps.
    pub pool_enter: Option<Vec<Step>>,
    /// Leaving the pool for service (the light resume). Default: nothing.
    pub pool_leave: Vec<Step>,
    /// Returning to the pool on scale-in (instance reuse). Default: nothing; the instance
    /// keeps its setup and its host keys.
    pub pool_return: Vec<Step>,
    /// Run at once when EC2 warns of a Spot interruption (two minutes before the instance
    /// goes), before the terminate hook's message arrives: e.g. an `ecs_drain` with a short
    /// timeout. Default: nothing.
    pub interrupt: Vec<Step>,
}

impl Layer {
    /// The steps an event of this phase runs.
    pub fn steps(&self, phase: Phase) -> &[Step] {
        match phase {
            Phase::Launch => &self.launch,
            Phase::Terminate => &self.terminate,
            Phase::PoolEnter => self.pool_enter.as_deref().unwrap_or(&self.launch),
            Phase::PoolLeave => &self.pool_leave,
            Phase::PoolReturn => &self.pool_return,
        }
    }

    /// Every step list the config gives, by its key, in the order the docs list them.
    pub fn step_lists(&self) -> Vec<(&'static str, &[Step])> {
        let mut lists: Vec<(&'static str, &[Step])> =
            vec![("launch", &self.launch), ("terminate", &self.terminate)];
        if let Some(enter) = &self.pool_enter {
            lists.push(("pool_enter", enter));
        }
        lists.push(("pool_leave", &self.pool_leave));
        lists.push(("pool_return", &self.pool_return));
        lists.push(("interrupt", &self.interrupt));
        lists
    }

    /// Every step of every list.
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.step_lists().into_iter().flat_map(|(_, l)| l.iter())
    }
}

/// The index of the first layer whose matcher accepts the event.
pub fn route(layers: &[Layer], event: &LifecycleEvent) -> Option<usize> {
    layers.iter().position(|l| l.matcher.matches(event))
}

/// A shell-style glob: `*` any run of characters, `?` one character, everything else literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        // Iterative wildcard match with backtracking to the last '*': linear in practice,
        // never exponential, whatever the pattern.
        let p: Vec<char> = self.0.chars().collect();
        let t: Vec<char> = text.chars().collect();
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

/// The part of a layer that decides whether an event belongs to it.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// Any of these globs must match the group name.
    pub groups: Vec<Glob>,
    /// Every key must be present in JSON metadata with a value matching the glob.
    pub metadata: BTreeMap<String, Glob>,
}

impl Matcher {
    pub fn matches(&self, event: &LifecycleEvent) -> bool {
        self.groups.iter().any(|g| g.matches(&event.group))
            && self
                .metadata
                .iter()
                .all(|(k, g)| event.metadata.get(k).is_some_and(|v| g.matches(&v)))
    }
}

/// The keys a `[layers.NAME]` table may have.
const LAYER_KEYS: &str =
    "groups, metadata, vars, on_failure, ssh, launch, terminate, pool_enter, pool_leave, pool_return, interrupt";

impl Layer {
    /// `[layers.*]`, in file order.
    pub(crate) fn all_from_raw(layers: &toml::Table, errs: &mut Vec<ConfigError>) -> Vec<Layer> {
        if layers.is_empty() {
            errs.push(ConfigError::new(
                "layers",
                "no layers: add at least one [layers.NAME] table",
            ));
        }
        layers
            .iter()
            .filter_map(|(name, value)| Layer::from_raw(name, value, errs))
            .collect()
    }

    /// `[layers.NAME]`; None when it is not even a table.
    fn from_raw(name: &str, value: &toml::Value, errs: &mut Vec<ConfigError>) -> Option<Layer> {
        let key = format!("layers.{name}");
        if !valid_layer_name(name) {
            errs.push(ConfigError::new(
                &key,
                "layer names are letters, digits, '-' and '_'",
            ));
        }
        let Some(t) = value.as_table() else {
            errs.push(ConfigError::new(
                &key,
                format!("must be a table with keys {LAYER_KEYS}"),
            ));
            return None;
        };
        let mut f = Fields::new(Some(t), key.as_str(), errs);
        let groups = layer_groups(&mut f);
        let metadata = layer_metadata(&mut f);
        let vars = layer_vars(&mut f);
        let on_failure = match f.string("on_failure") {
            None | Some("abandon") => HookResult::Abandon,
            Some("continue") => HookResult::Continue,
            Some(other) => {
                f.error(
                    "on_failure",
                    format!("{other:?} is not a result; expected \"abandon\" or \"continue\""),
                );
                HookResult::Abandon
            }
        };
        let ssh = match f.value("ssh") {
            Some(v) => LayerSsh::parse(v, &f.key("ssh"), f.errors()),
            None => LayerSsh::default(),
        };
        let launch = layer_steps(&mut f, "launch", &vars);
        let terminate = layer_steps(&mut f, "terminate", &vars);
        let pool_enter = f
            .value("pool_enter")
            .is_some()
            .then(|| layer_steps(&mut f, "pool_enter", &vars));
        let pool_leave = layer_steps(&mut f, "pool_leave", &vars);
        let pool_return = layer_steps(&mut f, "pool_return", &vars);
        let interrupt = layer_steps(&mut f, "interrupt", &vars);
        f.finish(&format!(
            "unknown key in a layer; expected one of: {LAYER_KEYS}"
        ));
        Some(Layer {
            name: name.to_string(),
            vars,
            matcher: Matcher { groups, metadata },
            on_failure,
            ssh,
            launch,
            terminate,
            pool_enter,
            pool_leave,
            pool_return,
            interrupt,
        })
    }
}

fn valid_layer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn layer_groups(f: &mut Fields<'_>) -> Vec<Glob> {
    let list = f.value("groups").and_then(|v| v.as_array());
    match list.filter(|l| !l.is_empty() && l.iter().all(toml::Value::is_str)) {
        Some(l) => l.iter().filter_map(|g| g.as_str()).map(Glob::new).collect(),
        None => {
            f.error(
                "groups",
                "missing: a list of Auto Scaling group name globs, e.g. [\"web-*\"]",
            );
            Vec::new()
        }
    }
}

fn layer_metadata(f: &mut Fields<'_>) -> BTreeMap<String, Glob> {
    let mut metadata = BTreeMap::new();
    let Some(t) = f.with("metadata", |v| {
        v.as_table()
            .ok_or_else(|| "must be a table of KEY = \"glob\"".to_string())
    }) else {
        return metadata;
    };
    for (k, v) in t {
        match v.as_str() {
            Some(s) => {
                metadata.insert(k.clone(), Glob::new(s));
            }
            None => f.error(&format!("metadata.{k}"), "must be a string glob"),
        }
    }
    metadata
}

fn layer_vars(f: &mut Fields<'_>) -> Vars {
    let mut vars = Vars::default();
    let Some(t) = f.with("vars", |v| {
        v.as_table()
            .ok_or_else(|| "must be a table of KEY = \"pattern\"".to_string())
    }) else {
        return vars;
    };
    for (k, v) in t {
        let vk = format!("vars.{k}");
        match v.as_str().map(Pattern::new) {
            Some(Ok(p)) => vars.insert(k.clone(), p),
            Some(Err(e)) => f.error(&vk, format!("not a valid pattern: {e}")),
            None => f.error(&vk, "must be a pattern string, e.g. \"[a-z0-9-]{1,32}\""),
        }
    }
    vars
}

/// `launch`, `terminate` or a `pool_*` list: step tables, each parsed by the step it names.
fn layer_steps(f: &mut Fields<'_>, which: &'static str, vars: &Vars) -> Vec<Step> {
    let Some(list) = f.with(which, |v| {
        v.as_array()
            .ok_or_else(|| "must be a list of steps: [ { KIND = ... }, ... ]".to_string())
    }) else {
        return Vec::new();
    };
    let mut steps = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let key = format!("{}[{i}]", f.key(which));
        match v.as_table().map(|t| step::parse(t, &key, vars)) {
            Some(Ok(s)) => steps.push(s),
            Some(Err(e)) => f.errors().extend(e),
            None => f.errors().push(ConfigError::new(
                key,
                "must be a step table, e.g. { tag = { Name = \"web\" } }",
            )),
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> LifecycleEvent {
        let body = serde_json::json!({
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "AutoScalingGroupName": "web-prod", "LifecycleHookName": "h",
            "EC2InstanceId": "i-0123456789abcdef0", "LifecycleActionToken": "t",
            "NotificationMetadata": "{\"environment\":\"production\"}",
        });
        match crate::event::parse(&body.to_string()) {
            crate::event::Parsed::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn globs() {
        let g = Glob::new("web-*");
        assert!(g.matches("web-prod") && g.matches("web-") && !g.matches("api-prod"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a?c*d").matches("abcxxd") && !Glob::new("a?c*d").matches("acxxd"));
        assert!(Glob::new("exact").matches("exact") && !Glob::new("exact").matches("exact2"));
        let long = "a".repeat(200);
        assert!(!Glob::new("*a*a*a*a*a*a*b").matches(&long));
    }

    fn layer(text: &str) -> Layer {
        let v: toml::Value = toml::from_str(text).unwrap();
        let mut errs = Vec::new();
        let l = Layer::from_raw("web", &v, &mut errs).unwrap();
        assert!(errs.is_empty(), "{errs:?}");
        l
    }

    #[test]
    fn warm_pool_phases_run_their_own_lists() {
        let l = layer(
            r#"groups = ["web-*"]
            launch = [{ tag = { Role = "launch" } }]
            terminate = [{ tag = { Role = "terminate" } }]
            pool_leave = [{ tag = { Role = "leave" } }, { tag = { Role = "leave2" } }]"#,
        );
        assert_eq!(l.steps(Phase::Launch).len(), 1);
        assert_eq!(l.steps(Phase::PoolEnter).len(), 1, "defaults to launch");
        assert_eq!(l.steps(Phase::PoolLeave).len(), 2);
        assert!(
            l.steps(Phase::PoolReturn).is_empty(),
            "keeps the instance as it is"
        );
        assert_eq!(l.steps(Phase::Terminate).len(), 1);
        let l = layer(
            r#"groups = ["web-*"]
            launch = [{ tag = { Role = "launch" } }]
            pool_enter = []
            pool_return = [{ tag = { Role = "back" } }]"#,
        );
        assert!(
            l.steps(Phase::PoolEnter).is_empty(),
            "an empty list is a list"
        );
        assert_eq!(l.steps(Phase::PoolReturn).len(), 1);
        assert_eq!(l.all_steps().count(), 2);
    }

    #[test]
    fn matcher_uses_groups_and_metadata() {
        let e = ev();
        let mut m = Matcher {
            groups: vec![Glob::new("web-*")],
            metadata: BTreeMap::new(),
        };
        assert!(m.matches(&e));
        m.metadata.insert("environment".into(), Glob::new("prod*"));
        assert!(m.matches(&e));
        m.metadata.insert("platform".into(), Glob::new("*"));
        assert!(!m.matches(&e), "absent key must not match");
    }
}
