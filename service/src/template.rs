//! The templates that build names and values from an event: `{instance_id}`, `{group}`,
//! `{metadata.KEY}`, ...
//!
//! Owns `{field}` templates, parsed once when the config is loaded (so a typo is a config
//! error, not a 3 a.m. failure) and rendered per event, and the declared metadata vars
//! ([`Vars`]) whose patterns a metadata value must match before any step sees it. Which
//! layer an event belongs to is [`crate::layer`]'s business.

use std::collections::BTreeMap;
use std::fmt;

use crate::event::{LifecycleEvent, Place, Transition};

/// The fields a template may name. `metadata.KEY` reads the event's JSON NotificationMetadata.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "instance_id",
    "group",
    "hook",
    "layer",
    "transition",
    "phase",
    "origin",
    "destination",
    "deadline",
    "metadata.KEY",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    InstanceId,
    Group,
    Hook,
    Layer,
    Transition,
    /// `launch`, `pool-enter`, `pool-leave`, `pool-return`, `terminate`.
    Phase,
    /// `EC2`, `AutoScalingGroup` or `WarmPool`.
    Origin,
    Destination,
    /// When EC2 said a Spot interruption takes the instance (RFC 3339); empty when it
    /// warned of none.
    Deadline,
    Metadata(String),
    /// A field only one step kind provides (e.g. the opsworks step's `{hostname}`).
    Extra(String),
}

/// A layer's declared variables: the NotificationMetadata keys its steps may use, each with
/// the pattern a value must match in full. Metadata is untrusted; this is its only way into
/// a command, a playbook or a document parameter.
#[derive(Debug, Clone, Default)]
pub struct Vars(BTreeMap<String, Pattern>);

#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    re: regex_lite::Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, String> {
        regex_lite::Regex::new(&format!("^(?:{source})$"))
            .map(|re| Pattern {
                source: source.to_string(),
                re,
            })
            .map_err(|e| e.to_string())
    }

    pub fn matches(&self, value: &str) -> bool {
        self.re.is_match(value)
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

impl Vars {
    pub fn insert(&mut self, key: String, pattern: Pattern) {
        self.0.insert(key, pattern);
    }

    pub fn get(&self, key: &str) -> Option<&Pattern> {
        self.0.get(key)
    }

    pub fn is_declared(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Pattern)> {
        self.0.iter().map(|(k, p)| (k.as_str(), p))
    }
}

/// A string with `{field}` placeholders; `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed '{{' in {0:?} (write '{{{{' for a literal brace)")]
    Unclosed(String),
    #[error("stray '}}' in {0:?} (write '}}}}' for a literal brace)")]
    Stray(String),
    #[error("unknown field {{{field}}} in {template:?}; known: {known}", known = known_fields())]
    UnknownField { field: String, template: String },
}

fn known_fields() -> String {
    TEMPLATE_FIELDS
        .iter()
        .map(|f| format!("{{{f}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rendering failed: the event lacks what the template asks for, or offers a value the
/// layer does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("template {template:?} needs metadata key {key:?}, but the event has {has}")]
    MissingMetadata {
        template: String,
        key: String,
        has: String,
    },
    #[error("metadata {key} = {value:?} does not match the layer's pattern {pattern:?}: rejected, nothing was run with it")]
    Disallowed {
        key: String,
        value: String,
        pattern: String,
    },
    #[error("template {template:?} needs {{{field}}}, which this step does not provide")]
    MissingExtra { template: String, field: String },
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, TemplateError> {
        Self::parse_with(source, &[])
    }

    /// Parses a template that may also name the step-specific fields in `extra`.
    pub fn parse_with(source: &str, extra: &[&str]) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err(TemplateError::Stray(source.to_string())),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(TemplateError::Unclosed(source.to_string())),
                        }
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    let name = name.trim();
                    if extra.contains(&name) {
                        pieces.push(Piece::Extra(name.to_string()));
                    } else {
                        pieces.push(field(name, source)?);
                    }
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Self {
            source: source.to_string(),
            pieces,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Metadata keys this template reads.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Metadata(k) => Some(k.as_str()),
            _ => None,
        })
    }

    /// True when the template reads names the message carries ({group}, {hook}): data that
    /// is validated only against control characters, never fit for a command line.
    pub fn reads_message_names(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Group | Piece::Hook))
    }

    /// The longest text the template contributes by itself (placeholders count as empty).
    pub fn literal_len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(s) => s.chars().count(),
                _ => 0,
            })
            .sum()
    }

    pub fn render(&self, ctx: &Context<'_>) -> Result<String, RenderError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::InstanceId => out.push_str(ctx.event.instance_id.as_str()),
                Piece::Group => out.push_str(&ctx.event.group),
                Piece::Hook => out.push_str(&ctx.event.hook),
                Piece::Layer => out.push_str(ctx.layer),
                Piece::Transition => out.push_str(ctx.event.transition.as_str()),
                Piece::Phase => out.push_str(ctx.event.phase().as_str()),
                Piece::Origin => out.push_str(origin(ctx.event)),
                Piece::Destination => out.push_str(destination(ctx.event)),
                Piece::Deadline => out.push_str(ctx.deadline.unwrap_or_default()),
                Piece::Metadata(key) => match ctx.event.metadata.get(key) {
                    Some(v) => {
                        if let Some(p) = ctx.vars.get(key) {
                            if !p.matches(&v) {
                                return Err(RenderError::Disallowed {
                                    key: key.clone(),
                                    value: v.chars().take(80).collect(),
                                    pattern: p.source.clone(),
                                });
                            }
                        }
                        out.push_str(&v)
                    }
                    None => {
                        return Err(RenderError::MissingMetadata {
                            template: self.source.clone(),
                            key: key.clone(),
                            has: ctx.event.metadata.describe().to_string(),
                        })
                    }
                },
                Piece::Extra(name) => match ctx.extra.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        return Err(RenderError::MissingExtra {
                            template: self.source.clone(),
                            field: name.clone(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn field(name: &str, source: &str) -> Result<Piece, TemplateError> {
    Ok(match name {
        "instance_id" => Piece::InstanceId,
        "group" => Piece::Group,
        "hook" => Piece::Hook,
        "layer" => Piece::Layer,
        "transition" => Piece::Transition,
        "phase" => Piece::Phase,
        "origin" => Piece::Origin,
        "destination" => Piece::Destination,
        "deadline" => Piece::Deadline,
        _ => match name.strip_prefix("metadata.") {
            Some(key) if !key.is_empty() => Piece::Metadata(key.to_string()),
            _ => {
                return Err(TemplateError::UnknownField {
                    field: name.to_string(),
                    template: source.to_string(),
                })
            }
        },
    })
}

/// The event's Origin; a message from before warm pools had none, and meant the plain
/// transition's (EC2 for a launch, the group for a termination).
fn origin(ev: &LifecycleEvent) -> &'static str {
    let place = ev.origin.unwrap_or(match ev.transition {
        Transition::Launch => Place::Ec2,
        Transition::Terminate => Place::AutoScalingGroup,
    });
    place.as_str()
}

/// The event's Destination, the plain transition's when the message had none.
fn destination(ev: &LifecycleEvent) -> &'static str {
    let place = ev.destination.unwrap_or(match ev.transition {
        Transition::Launch => Place::AutoScalingGroup,
        Transition::Terminate => Place::Ec2,
    });
    place.as_str()
}

/// What a template is rendered against.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub event: &'a LifecycleEvent,
    pub layer: &'a str,
    pub vars: &'a Vars,
    /// Values of step-specific fields (`Template::parse_with`).
    pub extra: &'a [(&'a str, &'a str)],
    /// The Spot interruption deadline, when EC2 warned of one (`{deadline}`).
    pub deadline: Option<&'a str>,
}

impl<'a> Context<'a> {
    pub fn new(event: &'a LifecycleEvent, layer: &'a str, vars: &'a Vars) -> Self {
        Context {
            event,
            layer,
            vars,
            extra: &[],
            deadline: None,
        }
    }

    pub fn with_deadline(self, deadline: Option<&'a str>) -> Self {
        Context { deadline, ..self }
    }

    pub fn with_extra(self, extra: &'a [(&'a str, &'a str)]) -> Self {
        Context { extra, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse, Parsed};

    fn ev() -> LifecycleEvent {
        let body = r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","AutoScalingGroupName":"web-prod","EC2InstanceId":"i-0123456789abcdef0","LifecycleHookName":"launch","LifecycleActionToken":"t-1","NotificationMetadata":"{\"environment\":\"production\",\"major\":3}"}"#;
        match parse(body) {
            Parsed::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renders_fields_and_metadata() {
        let e = ev();
        let vars = Vars::default();
        let ctx = Context::new(&e, "web", &vars);
        let t = Template::parse("v{metadata.major} {metadata.environment} {layer}/{group}/{hook}/{instance_id}/{transition} {{x}}").unwrap();
        assert_eq!(
            t.render(&ctx).unwrap(),
            "v3 production web/web-prod/launch/i-0123456789abcdef0/launch {x}"
        );
        assert_eq!(
            t.metadata_keys().collect::<Vec<_>>(),
            ["major", "environment"]
        );
    }

    #[test]
    fn origin_destination_and_phase() {
        let t = Template::parse("{origin}->{destination} ({phase})").unwrap();
        let vars = Vars::default();
        let legacy = ev();
        let ctx = Context::new(&legacy, "web", &vars);
        assert_eq!(t.render(&ctx).unwrap(), "EC2->AutoScalingGroup (launch)");
        let body = r#"{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING","Origin":"EC2","Destination":"WarmPool","AutoScalingGroupName":"web-prod","EC2InstanceId":"i-0123456789abcdef0","LifecycleHookName":"launch","LifecycleActionToken":"t-1"}"#;
        let Parsed::Event(warm) = parse(body) else {
            panic!()
        };
        let ctx = Context::new(&warm, "web", &vars);
        assert_eq!(t.render(&ctx).unwrap(), "EC2->WarmPool (pool-enter)");
    }

    #[test]
    fn missing_metadata_names_the_key() {
        let e = ev();
        let vars = Vars::default();
        let ctx = Context::new(&e, "web", &vars);
        let err = Template::parse("{metadata.platform}")
            .unwrap()
            .render(&ctx)
            .unwrap_err();
        assert!(err.to_string().contains("\"platform\""), "{err}");
    }

    #[test]
    fn declared_vars_are_validated_in_full() {
        let e = ev();
        let mut vars = Vars::default();
        vars.insert("environment".into(), Pattern::new("prod|staging").unwrap());
        let ctx = Context::new(&e, "web", &vars);
        assert!(
            Template::parse("{metadata.environment}")
                .unwrap()
                .render(&ctx)
                .is_err(),
            "production is not prod"
        );
        vars.insert("environment".into(), Pattern::new("[a-z]+").unwrap());
        let ctx = Context::new(&e, "web", &vars);
        assert_eq!(
            Template::parse("{metadata.environment}")
                .unwrap()
                .render(&ctx)
                .unwrap(),
            "production"
        );
        let p = Pattern::new("[a-z]+").unwrap();
        assert!(
            !p.matches("{{ lookup('pipe', 'id') }}") && !p.matches("a; rm -rf /") && !p.matches("")
        );
    }

    #[test]
    fn extra_fields_only_where_allowed() {
        assert!(Template::parse("{hostname}").is_err());
        let t = Template::parse_with("{metadata.major} - {hostname}", &["hostname"]).unwrap();
        let e = ev();
        let vars = Vars::default();
        let ctx = Context::new(&e, "web", &vars);
        assert!(matches!(
            t.render(&ctx),
            Err(RenderError::MissingExtra { .. })
        ));
        let extra = [("hostname", "app1")];
        assert_eq!(t.render(&ctx.with_extra(&extra)).unwrap(), "3 - app1");
    }

    #[test]
    fn parse_errors() {
        assert!(matches!(
            Template::parse("{nope}"),
            Err(TemplateError::UnknownField { .. })
        ));
        assert!(matches!(
            Template::parse("{metadata.}"),
            Err(TemplateError::UnknownField { .. })
        ));
        assert!(matches!(
            Template::parse("a{b"),
            Err(TemplateError::Unclosed(_))
        ));
        assert!(matches!(
            Template::parse("a}b"),
            Err(TemplateError::Stray(_))
        ));
    }
}
