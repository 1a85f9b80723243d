//! The `tag` step: EC2 CreateTags on the instance, values templated from the event.
//!
//! `{ tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}" } }`.
//! Repeating it sets the same tags again, so it is safe under redelivery.

use crate::retry::with_backoff;
use crate::setting::ConfigError;
use crate::template::Template;

use super::{StepContext, StepError, StepOutput};

/// EC2 limits: keys 1..=128 characters, values 0..=256, at most 50 tags per resource.
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 256;
const MAX_TAGS: usize = 50;

#[derive(Debug, Clone)]
pub struct Tag {
    tags: Vec<(String, Template)>,
}

impl Tag {
    pub fn parse(value: &toml::Value, key: &str) -> Result<Tag, Vec<ConfigError>> {
        let table = value.as_table().ok_or_else(|| {
            vec![ConfigError::new(
                key,
                "must be a table of tag names to values",
            )]
        })?;
        let mut errs = Vec::new();
        if table.is_empty() {
            errs.push(ConfigError::new(key, "names no tags"));
        }
        if table.len() > MAX_TAGS {
            errs.push(ConfigError::new(
                key,
                format!("EC2 allows at most {MAX_TAGS} tags"),
            ));
        }
        let mut tags = Vec::new();
        for (name, v) in table {
            let k = format!("{key}.{name}");
            if name.is_empty()
                || name.chars().count() > MAX_KEY
                || name.to_ascii_lowercase().starts_with("aws:")
            {
                errs.push(ConfigError::new(
                    &k,
                    format!(
                        "tag keys are 1..={MAX_KEY} characters and may not start with \"aws:\""
                    ),
                ));
            }
            let Some(s) = v.as_str() else {
                errs.push(ConfigError::new(&k, "must be a string"));
                continue;
            };
            match Template::parse(s) {
                Ok(t) if t.literal_len() > MAX_VALUE => errs.push(ConfigError::new(
                    &k,
                    format!("longer than {MAX_VALUE} characters"),
                )),
                Ok(t) => tags.push((name.clone(), t)),
                Err(e) => errs.push(ConfigError::new(&k, e.to_string())),
            }
        }
        if errs.is_empty() {
            Ok(Tag { tags })
        } else {
            Err(errs)
        }
    }

    pub fn describe(&self) -> String {
        let list: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("tag {}", list.join(", "))
    }

    /// The tags for one event, or why they cannot be made.
    pub fn render(
        &self,
        ctx: &crate::template::Context<'_>,
    ) -> Result<Vec<(String, String)>, StepError> {
        self.tags
            .iter()
            .map(|(k, t)| {
                let v = t.render(ctx).map_err(|e| StepError::Input(e.to_string()))?;
                if v.chars().count() > MAX_VALUE {
                    return Err(StepError::Input(format!(
                        "tag {k} would be {} characters; EC2 allows {MAX_VALUE}",
                        v.chars().count()
                    )));
                }
                Ok((k.clone(), v))
            })
            .collect()
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let tags = self.render(&ctx.template)?;
        let id = &ctx.template.event.instance_id;
        with_backoff(ctx.retry_for, || {
            ctx.services.instances.create_tags(id, &tags)
        })
        .await?;
        let names: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
        Ok(StepOutput {
            detail: format!("tagged {id} with {}", names.join(", ")),
        })
    }
}
