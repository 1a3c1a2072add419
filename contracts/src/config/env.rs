//! The environment layer of the configuration: `SECKILL__<SECTION>__<KEY>`
//! variables as a figment provider.
//!
//! It reads the same way as figment's `Env::prefixed(ENV_PREFIX).split("__")`
//! (prefix matched case-insensitively, `__` nests, keys lowercased, values
//! parsed as figment parses env values), but from the pairs it is given
//! rather than from the process environment. The real entry point passes
//! the process environment; tests pass their own pairs, because setting
//! process variables while other test threads read them is unsound
//! (`std::env::set_var` is `unsafe` from edition 2024 for that reason).

use figment::value::{Dict, Map, Value};
use figment::{Error, Metadata, Profile, Provider};

/// The variables of one environment that carry configuration.
pub(super) struct EnvVars {
    prefix: String,
    /// (key path with `.` between levels, lowercased; raw value).
    vars: Vec<(String, String)>,
}

impl EnvVars {
    /// Keeps the variables named `<prefix><SECTION>__<KEY>...`; the rest of
    /// the environment is ignored.
    pub(super) fn new(prefix: &str, vars: impl IntoIterator<Item = (String, String)>) -> EnvVars {
        let vars = vars
            .into_iter()
            .filter_map(|(name, value)| Some((key_path(prefix, &name)?, value)))
            .collect();
        EnvVars {
            prefix: prefix.to_string(),
            vars,
        }
    }

    /// The process environment; a name or value that is not UTF-8 is read
    /// lossily, as figment's `Env` does.
    pub(super) fn process(prefix: &str) -> EnvVars {
        let vars = std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        });
        EnvVars::new(prefix, vars)
    }
}

/// `SECKILL__WORKER__BATCH_SIZE` → `worker.batch_size`; `None` for another
/// prefix or an empty level (`SECKILL__WORKER____X`).
fn key_path(prefix: &str, name: &str) -> Option<String> {
    let name = name.trim();
    let head = name.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let path = name[prefix.len()..].replace("__", ".").to_ascii_lowercase();
    (!path.split('.').any(str::is_empty)).then_some(path)
}

/// Puts `value` at `path` inside `dict`, creating the levels on the way and
/// keeping what other variables put beside it.
fn insert(dict: &mut Dict, path: &[&str], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        dict.insert((*first).to_string(), value);
        return;
    }
    let entry = dict
        .entry((*first).to_string())
        .or_insert_with(|| Value::from(Dict::new()));
    if !matches!(entry, Value::Dict(..)) {
        // A deeper variable wins over a shallower one naming the same level.
        *entry = Value::from(Dict::new());
    }
    if let Value::Dict(_, inner) = entry {
        insert(inner, rest, value);
    }
}

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        let prefix = self.prefix.to_ascii_uppercase();
        Metadata::named(format!("`{prefix}` environment variable(s)")).interpolater(
            move |_: &Profile, keys: &[&str]| {
                let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("{prefix}{}", keys.join("__"))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let mut dict = Dict::new();
        for (path, raw) in &self.vars {
            let Ok(value) = raw.parse::<Value>();
            let levels: Vec<&str> = path.split('.').collect();
            insert(&mut dict, &levels, value);
        }
        Ok(Profile::Default.collect(dict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prefixed_names_become_lowercase_key_paths() {
        let p = "SECKILL__";
        assert_eq!(
            key_path(p, "SECKILL__WORKER__BATCH_SIZE").as_deref(),
            Some("worker.batch_size")
        );
        assert_eq!(
            key_path(p, "seckill__redis__url").as_deref(),
            Some("redis.url")
        );
        assert_eq!(key_path(p, "PATH"), None);
        assert_eq!(key_path(p, "SECKILL__"), None);
        assert_eq!(key_path(p, "SECKILL__WORKER____X"), None);
    }

    #[test]
    fn variables_of_one_section_merge() {
        let env = EnvVars::new(
            "SECKILL__",
            [
                ("SECKILL__REDIS__URL".to_string(), "redis://x/".to_string()),
                ("SECKILL__REDIS__KEY_PREFIX".to_string(), "p".to_string()),
                ("HOME".to_string(), "/root".to_string()),
            ],
        );
        let data = env.data().expect("data");
        let redis = data[&Profile::Default]["redis"]
            .as_dict()
            .expect("a section");
        assert_eq!(redis["url"].as_str(), Some("redis://x/"));
        assert_eq!(redis["key_prefix"].as_str(), Some("p"));
        assert_eq!(data[&Profile::Default].len(), 1, "HOME is not config");
    }
}
