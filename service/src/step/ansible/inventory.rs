//! The inventory of one run, as Ansible's EC2 inventory (`amazon.aws.aws_ec2`) would give
//! the same instances, so that playbooks and `group_vars` written for it run unchanged.
//!
//! Each instance is a host named by its instance id, in:
//! - `all`, and the group named exactly after its layer (`hosts: web-prod`), plus that
//!   name sanitised (`web_prod`) when it differs, for `group_vars/web_prod.yml` and for
//!   Ansible set to transform group names;
//! - the groups of `ansible.keyed_groups` (by default `tag_KEY_VALUE` for each tag,
//!   `instance_type_TYPE`, `aws_region_REGION` and the availability zone), built as the
//!   plugin's `keyed_groups` builds them and sanitised as it sanitises them.
//!
//! Its host variables are the plugin's names for what DescribeInstances said (`ec2_tags` and
//! `tags`, `private_ip_address`, `placement.availability_zone`, `instance_type`,
//! `image_id`, ...) beside the connection variables ([`crate::ssh::Remote`]). Every string
//! that came from EC2 is written as `{"__ansible_unsafe": ...}`: tags are anyone's who may
//! tag the instance, and Ansible never evaluates such a value as a template (a `{{` in a
//! tag stays text). Tags past EC2's own limits (128-character keys, 256-character values)
//! are left out.
//!
//! Owns the groups and host variables; not the connection variables (`ssh`) nor the run
//! (`runner`).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::aws::InstanceInfo;
use crate::setting::ConfigError;

/// EC2's limits on one tag (characters): longer ones are not EC2's, so they are left out.
const TAG_KEY_MAX: usize = 128;
const TAG_VALUE_MAX: usize = 256;
/// A keyed group's prefix and separator.
const AFFIX_MAX: usize = 64;

/// What a keyed group is keyed on: one of the host variables below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupKey {
    /// `tags` / `ec2_tags`: one group per tag, `KEY<sep>VALUE`.
    Tags,
    /// `tags.NAME` / `tags['NAME']`: the value of one tag.
    Tag(String),
    InstanceType,
    ImageId,
    Architecture,
    KeyName,
    VpcId,
    SubnetId,
    AvailabilityZone,
    Region,
}

/// One entry of `ansible.keyed_groups`: the plugin's `keyed_groups` entry without Jinja
/// (`key` names a host variable), with its `prefix` and `separator` (default `_`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedGroup {
    pub key: GroupKey,
    pub prefix: String,
    pub separator: String,
}

impl KeyedGroup {
    fn new(key: GroupKey, prefix: &str, separator: &str) -> KeyedGroup {
        KeyedGroup {
            key,
            prefix: prefix.to_string(),
            separator: separator.to_string(),
        }
    }

    /// The default `ansible.keyed_groups`: the groups `amazon.aws.aws_ec2`'s documented
    /// example makes (`tag_Role_web`, `instance_type_t3_micro`, `aws_region_us_east_1`),
    /// and the availability zone's bare name (`us_east_1a`, the old `ec2.py`'s group).
    pub fn defaults() -> Vec<KeyedGroup> {
        vec![
            KeyedGroup::new(GroupKey::Tags, "tag", "_"),
            KeyedGroup::new(GroupKey::InstanceType, "instance_type", "_"),
            KeyedGroup::new(GroupKey::Region, "aws_region", "_"),
            KeyedGroup::new(GroupKey::AvailabilityZone, "", ""),
        ]
    }

    /// Parses `ansible.keyed_groups`: a list of `{ key = "...", prefix = "...", separator =
    /// "..." }`.
    pub fn parse_list(v: &toml::Value, key: &str) -> Result<Vec<KeyedGroup>, Vec<ConfigError>> {
        let Some(list) = v.as_array() else {
            return Err(vec![ConfigError::new(
                key,
                "must be a list of { key = \"tags\", prefix = \"tag\" } tables",
            )]);
        };
        let mut errs = Vec::new();
        let mut out = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            match KeyedGroup::parse(entry, &format!("{key}[{i}]")) {
                Ok(g) => out.push(g),
                Err(e) => errs.extend(e),
            }
        }
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(errs)
        }
    }

    fn parse(v: &toml::Value, key: &str) -> Result<KeyedGroup, Vec<ConfigError>> {
        let Some(t) = v.as_table() else {
            return Err(vec![ConfigError::new(
                key,
                "must be a table { key = \"...\", prefix = \"...\", separator = \"...\" }",
            )]);
        };
        let mut errs = Vec::new();
        let group_key = match t.get("key").and_then(|k| k.as_str()).map(GroupKey::parse) {
            Some(Some(k)) => Some(k),
            _ => {
                errs.push(ConfigError::new(
                    format!("{key}.key"),
                    "one of tags, tags.NAME, instance_type, image_id, architecture, key_name, vpc_id, subnet_id, placement.availability_zone, placement.region",
                ));
                None
            }
        };
        let mut affix = |name: &str, default: &str| match t.get(name) {
            None => default.to_string(),
            Some(toml::Value::String(s)) if s.chars().count() <= AFFIX_MAX => s.clone(),
            Some(_) => {
                errs.push(ConfigError::new(
                    format!("{key}.{name}"),
                    format!("must be a string of at most {AFFIX_MAX} characters"),
                ));
                String::new()
            }
        };
        let prefix = affix("prefix", "");
        let separator = affix("separator", "_");
        for k in t.keys() {
            if !["key", "prefix", "separator"].contains(&k.as_str()) {
                errs.push(ConfigError::new(
                    format!("{key}.{k}"),
                    "unknown key (key, prefix, separator)",
                ));
            }
        }
        match group_key {
            Some(key) if errs.is_empty() => Ok(KeyedGroup {
                key,
                prefix,
                separator,
            }),
            _ => Err(errs),
        }
    }

    /// The groups this entry puts `host` in (sanitised). As the plugin: nothing for an
    /// absent or empty value; `prefix + separator + value`, the separator kept even after an
    /// empty prefix; for tags, `KEY + separator + VALUE` as the value.
    fn groups(&self, host: &Facts<'_>) -> Vec<String> {
        let values: Vec<String> = match &self.key {
            GroupKey::Tags => host
                .tags
                .iter()
                .map(|(k, v)| format!("{k}{}{v}", self.separator))
                .collect(),
            other => host.scalar(other).into_iter().map(str::to_string).collect(),
        };
        values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(|v| safe_group_name(&format!("{}{}{v}", self.prefix, self.separator)))
            .collect()
    }
}

impl GroupKey {
    fn parse(s: &str) -> Option<GroupKey> {
        let tag = |rest: &str| {
            let name = rest
                .strip_prefix('.')
                .or_else(|| {
                    let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
                    inner
                        .strip_prefix('\'')
                        .and_then(|n| n.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"')?.strip_suffix('"'))
                })
                .filter(|n| !n.is_empty() && n.chars().count() <= TAG_KEY_MAX)?;
            Some(GroupKey::Tag(name.to_string()))
        };
        Some(match s {
            "tags" | "ec2_tags" => GroupKey::Tags,
            "instance_type" => GroupKey::InstanceType,
            "image_id" => GroupKey::ImageId,
            "architecture" => GroupKey::Architecture,
            "key_name" => GroupKey::KeyName,
            "vpc_id" => GroupKey::VpcId,
            "subnet_id" => GroupKey::SubnetId,
            "placement.availability_zone" => GroupKey::AvailabilityZone,
            "placement.region" => GroupKey::Region,
            _ => {
                let rest = s
                    .strip_prefix("ec2_tags")
                    .or_else(|| s.strip_prefix("tags"))?;
                return tag(rest);
            }
        })
    }
}

/// The plugin's group name sanitising (ansible-core's `to_safe_group_name`, forced, as
/// `constructed` features apply it): every character that is not a word character (letters,
/// digits, `_`), and a leading digit, becomes `_`. Unicode letters and digits are word
/// characters, as in Python's `\w`.
pub fn safe_group_name(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            let word = c == '_' || c.is_alphanumeric();
            if !word || (i == 0 && c.is_numeric()) {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The groups of the layer: its exact name, and its sanitised name when that differs.
pub fn layer_groups(layer: &str) -> Vec<String> {
    let safe = safe_group_name(layer);
    if safe == layer {
        vec![layer.to_string()]
    } else {
        vec![layer.to_string(), safe]
    }
}

/// The groups of one host besides `all`: its layer's, then its keyed groups, each once;
/// never Ansible's own `all` or `ungrouped` (a layer or a tag value so named), which no
/// group may contain.
pub fn host_groups(layer: &str, info: &InstanceInfo, keyed: &[KeyedGroup]) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for g in layer_groups(layer)
        .into_iter()
        .chain(keyed_groups(info, keyed))
    {
        if g != "all" && g != "ungrouped" && !groups.contains(&g) {
            groups.push(g);
        }
    }
    groups
}

/// An instance's tags within EC2's limits, and its facts.
struct Facts<'a> {
    info: &'a InstanceInfo,
    tags: BTreeMap<&'a str, &'a str>,
}

impl<'a> Facts<'a> {
    fn of(info: &'a InstanceInfo) -> Facts<'a> {
        let tags = info
            .tags
            .iter()
            .filter(|(k, v)| {
                !k.is_empty()
                    && k.chars().count() <= TAG_KEY_MAX
                    && v.chars().count() <= TAG_VALUE_MAX
            })
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Facts { info, tags }
    }

    fn region(&self) -> Option<&'a str> {
        // As the plugin: the zone less its last letter (us-east-1a -> us-east-1).
        let az = self.info.facts.availability_zone.as_deref()?;
        let mut chars = az.char_indices();
        chars.next_back().map(|(i, _)| &az[..i])
    }

    fn scalar(&self, key: &GroupKey) -> Option<&'a str> {
        let f = &self.info.facts;
        match key {
            GroupKey::Tags => None,
            GroupKey::Tag(name) => self.tags.get(name.as_str()).copied(),
            GroupKey::InstanceType => f.instance_type.as_deref(),
            GroupKey::ImageId => f.image_id.as_deref(),
            GroupKey::Architecture => f.architecture.as_deref(),
            GroupKey::KeyName => f.key_name.as_deref(),
            GroupKey::VpcId => f.vpc_id.as_deref(),
            GroupKey::SubnetId => f.subnet_id.as_deref(),
            GroupKey::AvailabilityZone => f.availability_zone.as_deref(),
            GroupKey::Region => self.region(),
        }
    }
}

/// A string Ansible must never evaluate as a template.
fn unsafe_text(s: &str) -> Value {
    json!({ "__ansible_unsafe": s })
}

/// The groups `info`'s instance belongs to by `keyed` (besides `all` and its layer's).
pub fn keyed_groups(info: &InstanceInfo, keyed: &[KeyedGroup]) -> Vec<String> {
    let facts = Facts::of(info);
    let mut out: Vec<String> = Vec::new();
    for k in keyed {
        for g in k.groups(&facts) {
            if !out.contains(&g) {
                out.push(g);
            }
        }
    }
    out
}

/// The host variables the plugin would give `info`'s instance, every EC2 string unsafe.
pub fn ec2_host_vars(info: &InstanceInfo) -> Map<String, Value> {
    let facts = Facts::of(info);
    let f = &info.facts;
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<&str>| {
        if let Some(v) = v {
            m.insert(k.to_string(), unsafe_text(v));
        }
    };
    put("instance_id", Some(info.id.as_str()));
    put("instance_type", f.instance_type.as_deref());
    put("image_id", f.image_id.as_deref());
    put("architecture", f.architecture.as_deref());
    put("key_name", f.key_name.as_deref());
    put("launch_time", f.launch_time.as_deref());
    put("vpc_id", f.vpc_id.as_deref());
    put("subnet_id", f.subnet_id.as_deref());
    put("private_ip_address", info.private_ip.as_deref());
    put("public_ip_address", info.public_ip.as_deref());
    put("private_dns_name", info.private_dns.as_deref());
    put("public_dns_name", info.public_dns.as_deref());
    let mut placement = Map::new();
    if let Some(az) = f.availability_zone.as_deref() {
        placement.insert("availability_zone".into(), unsafe_text(az));
    }
    if let Some(r) = facts.region() {
        placement.insert("region".into(), unsafe_text(r));
    }
    m.insert("placement".into(), Value::Object(placement));
    // Keys stay plain: Ansible never evaluates a mapping's keys.
    let tags: Map<String, Value> = facts
        .tags
        .iter()
        .map(|(k, v)| (k.to_string(), unsafe_text(v)))
        .collect();
    // `ec2_tags` is the plugin's name; `tags` its older one, kept while it keeps it.
    m.insert("ec2_tags".into(), Value::Object(tags.clone()));
    m.insert("tags".into(), Value::Object(tags));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::ec2::InstanceFacts;
    use crate::aws::InstanceState;

    fn info(tags: &[(&str, &str)]) -> InstanceInfo {
        InstanceInfo {
            id: "i-0123456789abcdef0".into(),
            state: InstanceState::Running,
            private_ip: Some("10.0.0.4".into()),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            facts: InstanceFacts {
                instance_type: Some("t3.micro".into()),
                image_id: Some("ami-12c6146b".into()),
                availability_zone: Some("us-east-1a".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Expected names computed with ansible-core 2.19's own
    /// `ansible.plugins.inventory.to_safe_group_name` (forced, as keyed_groups applies it).
    #[test]
    fn group_names_are_sanitised_as_ansible_does() {
        for (raw, safe) in [
            ("tag_env_staging", "tag_env_staging"),
            ("tag_Role_web-1", "tag_Role_web_1"),
            (
                "tag_aws:autoscaling:groupName_web-prod",
                "tag_aws_autoscaling_groupName_web_prod",
            ),
            (
                "tag_Note_{{ lookup('pipe','id') }}",
                "tag_Note____lookup__pipe___id_____",
            ),
            ("1st", "_st"),
            ("-x", "_x"),
            ("tag_café_ünï", "tag_café_ünï"),
            ("tag_a b.c/d", "tag_a_b_c_d"),
            ("web-prod", "web_prod"),
        ] {
            assert_eq!(safe_group_name(raw), safe, "{raw}");
        }
    }

    #[test]
    fn default_keyed_groups_are_the_ec2_inventorys() {
        let i = info(&[
            ("env", "staging"),
            ("Role", "web"),
            ("aws:autoscaling:groupName", "web-prod"),
            ("Empty", ""),
        ]);
        let groups = keyed_groups(&i, &KeyedGroup::defaults());
        assert_eq!(
            groups,
            [
                "tag_Empty_",
                "tag_Role_web",
                "tag_aws_autoscaling_groupName_web_prod",
                "tag_env_staging",
                "instance_type_t3_micro",
                "aws_region_us_east_1",
                "us_east_1a",
            ]
        );
    }

    #[test]
    fn keyed_groups_parse_like_the_plugins_entries() {
        let v: toml::Value = toml::from_str::<toml::Table>(
            "k = [ { key = \"tags.Role\", prefix = \"role\" }, { key = \"tags['aws:autoscaling:groupName']\", separator = \"\" }, { key = \"image_id\", prefix = \"ami\", separator = \"-\" } ]",
        )
        .unwrap()["k"]
            .clone();
        let keyed = KeyedGroup::parse_list(&v, "ansible.keyed_groups").unwrap();
        let i = info(&[("Role", "web"), ("aws:autoscaling:groupName", "web-prod")]);
        assert_eq!(
            keyed_groups(&i, &keyed),
            ["role_web", "web_prod", "ami_ami_12c6146b"]
        );
        let bad: toml::Value = toml::from_str::<toml::Table>(
            "k = [ { key = \"{{ x }}\" }, { key = \"tags\", prefix = 3, other = 1 } ]",
        )
        .unwrap()["k"]
            .clone();
        let errs = KeyedGroup::parse_list(&bad, "ansible.keyed_groups").unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "ansible.keyed_groups[0].key",
                "ansible.keyed_groups[1].prefix",
                "ansible.keyed_groups[1].other"
            ]
        );
    }

    #[test]
    fn host_vars_carry_every_ec2_string_unsafe_and_over_long_tags_are_left_out() {
        let long = "x".repeat(TAG_VALUE_MAX + 1);
        let i = info(&[("Note", "{{ lookup('pipe','id') }}"), ("Big", &long)]);
        let hv = ec2_host_vars(&i);
        assert_eq!(
            hv["ec2_tags"]["Note"],
            json!({"__ansible_unsafe": "{{ lookup('pipe','id') }}"})
        );
        assert!(hv["ec2_tags"].get("Big").is_none());
        assert_eq!(hv["tags"], hv["ec2_tags"]);
        assert_eq!(
            hv["placement"],
            json!({"availability_zone": {"__ansible_unsafe": "us-east-1a"}, "region": {"__ansible_unsafe": "us-east-1"}})
        );
        assert_eq!(hv["instance_type"], json!({"__ansible_unsafe": "t3.micro"}));
        assert_eq!(
            hv["private_ip_address"],
            json!({"__ansible_unsafe": "10.0.0.4"})
        );
        assert!(hv.get("public_ip_address").is_none());
        assert!(!keyed_groups(&i, &KeyedGroup::defaults())
            .iter()
            .any(|g| g.starts_with("tag_Big")));
    }

    #[test]
    fn the_layer_group_is_its_exact_name_with_a_sanitised_alias() {
        assert_eq!(layer_groups("web-prod"), ["web-prod", "web_prod"]);
        assert_eq!(layer_groups("web"), ["web"]);
        let keyed = [KeyedGroup::new(GroupKey::Tag("g".into()), "", "")];
        let i = info(&[("g", "ungrouped")]);
        assert_eq!(host_groups("all", &i, &keyed), Vec::<String>::new());
        let i = info(&[("g", "web")]);
        assert_eq!(host_groups("web", &i, &keyed), ["web"]);
    }
}
