//! Discovery rules: scrape settings for Cloud Map services that cannot carry
//! tags. ECS Service Connect creates and owns its Cloud Map services, so users
//! cannot tag them with `METRICS_PORT` and friends; a rule, matched on the
//! namespace and service names, supplies those settings instead.
//!
//! The rules are a JSON list in the SSM parameter `DISCOVERY_RULES_PARAMETER_NAME`,
//! re-read every cycle like the namespace list. The first rule whose globs match
//! a service applies, setting by setting, only where the service's own tags are
//! silent: tags always win. A parameter that fails to parse, or any bad rule in
//! it, is reported once (rule index and field) and the last good rules stay in
//! force; one that never parsed means no rules.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::aws::AwsCallError;
use crate::targets::{self, parse_prometheus_duration, MIN_SCRAPE_INTERVAL, TAG_NETWORK_MODE};

/// One rule: where it applies, and the settings it supplies, as the tags they
/// stand for (`metrics_port` supplies `METRICS_PORT`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub namespace: Glob,
    pub service: Glob,
    pub supplies: BTreeMap<&'static str, String>,
}

/// The rules in force, in the order they are tried.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules(Vec<Rule>);

impl Rules {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first rule matching a service, with its index.
    pub fn find(&self, namespace: &str, service: &str) -> Option<(usize, &Rule)> {
        self.0
            .iter()
            .enumerate()
            .find(|(_, r)| r.namespace.matches(namespace) && r.service.matches(service))
    }

    /// A service's settings: its tags, and what the first matching rule supplies
    /// where the tags are silent.
    pub fn settings(
        &self,
        namespace: &str,
        service: &str,
        tags: &BTreeMap<String, String>,
    ) -> Settings {
        let Some((index, rule)) = self.find(namespace, service) else {
            return Settings {
                values: tags.clone(),
                rule: None,
            };
        };
        let mut values = tags.clone();
        let mut from_rule = Vec::new();
        for (tag, value) in &rule.supplies {
            if !values.contains_key(*tag) {
                values.insert((*tag).to_owned(), value.clone());
                from_rule.push(*tag);
            }
        }
        Settings {
            values,
            rule: Some(RuleOrigin {
                index,
                settings: from_rule,
            }),
        }
    }
}

/// What configures a service's targets: its tags merged with a rule's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// By tag name.
    pub values: BTreeMap<String, String>,
    /// The rule that supplied some of them.
    pub rule: Option<RuleOrigin>,
}

/// Which rule supplied which settings (tag names) of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    pub index: usize,
    pub settings: Vec<&'static str>,
}

impl RuleOrigin {
    /// Whether `tag` came from the rule.
    pub fn supplied(&self, tag: &str) -> bool {
        self.settings.contains(&tag)
    }
}

/// A glob over a name: `*` matches any run of characters, `?` any one; all else
/// matches itself (case-sensitive, as Cloud Map names are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(Arc<str>);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(Arc::from(pattern))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Iterative matching with backtracking to the last `*` only: linear in
    /// practice, never exponential. Bytes when both are ASCII (Cloud Map names
    /// almost always are), characters otherwise.
    pub fn matches(&self, name: &str) -> bool {
        if self.0.is_ascii() && name.is_ascii() {
            glob_match(self.0.as_bytes(), name.as_bytes(), b'*', b'?')
        } else {
            let pattern: Vec<char> = self.0.chars().collect();
            let name: Vec<char> = name.chars().collect();
            glob_match(&pattern, &name, '*', '?')
        }
    }
}

fn glob_match<T: Copy + PartialEq>(pattern: &[T], name: &[T], any: T, one: T) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(&c) if c == any => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == one || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == any)
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What is wrong with the rules parameter. Each names the parameter, and for a
/// bad rule its index and field.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RulesError {
    #[error(
        "SSM parameter {parameter:?} (DISCOVERY_RULES_PARAMETER_NAME) does not exist: create it \
         with a JSON list of rules, or unset DISCOVERY_RULES_PARAMETER_NAME"
    )]
    NotFound { parameter: String },
    #[error(
        "SSM parameter {parameter:?} (DISCOVERY_RULES_PARAMETER_NAME) is not valid JSON: {detail}"
    )]
    Json { parameter: String, detail: String },
    #[error(
        "SSM parameter {parameter:?} (DISCOVERY_RULES_PARAMETER_NAME) is not a JSON list of \
         rules (objects such as {{\"service\": \"orders-*\", \"metrics_port\": 9100}})"
    )]
    NotAList { parameter: String },
    #[error("SSM parameter {parameter:?}: rules[{index}] is not a JSON object")]
    NotAnObject { parameter: String, index: usize },
    #[error(
        "SSM parameter {parameter:?}: rules[{index}] has unknown field {field:?}; the fields are \
         {}", FIELDS.join(", ")
    )]
    UnknownField {
        parameter: String,
        index: usize,
        field: String,
    },
    #[error("SSM parameter {parameter:?}: rules[{index}].{field} = {value} {why}")]
    BadField {
        parameter: String,
        index: usize,
        field: &'static str,
        value: String,
        why: String,
    },
    #[error(transparent)]
    Aws(#[from] AwsCallError),
}

/// What a rule field is and which tag(s) it stands for.
enum Field {
    Glob,
    Port(&'static [&'static str]),
    Path(&'static [&'static str]),
    Scheme(&'static [&'static str]),
    Interval(&'static [&'static str]),
    Timeout(&'static [&'static str]),
    NetworkMode,
}

use targets::{
    TAG_ECS_METRICS_INTERVAL as ECS_INTERVAL, TAG_ECS_METRICS_PATH as ECS_PATH,
    TAG_ECS_METRICS_PORT as ECS_PORT, TAG_ECS_METRICS_SCHEME as ECS_SCHEME,
    TAG_ECS_METRICS_TIMEOUT as ECS_TIMEOUT, TAG_METRICS_INTERVAL as APP_INTERVAL,
    TAG_METRICS_PATH as APP_PATH, TAG_METRICS_PORT as APP_PORT, TAG_METRICS_SCHEME as APP_SCHEME,
    TAG_METRICS_TIMEOUT as APP_TIMEOUT,
};

/// Every field a rule may have, in the order they are documented.
const FIELDS: &[&str] = &[
    "namespace",
    "service",
    "metrics_port",
    "metrics_path",
    "metrics_scheme",
    "metrics_interval",
    "metrics_timeout",
    "ecs_metrics_port",
    "ecs_metrics_path",
    "ecs_metrics_scheme",
    "ecs_metrics_interval",
    "ecs_metrics_timeout",
    "scheme",
    "interval",
    "timeout",
    "network_mode",
];

fn field(name: &str) -> Option<(&'static str, Field)> {
    let i = FIELDS.iter().position(|f| *f == name)?;
    let kind = match FIELDS[i] {
        "namespace" | "service" => Field::Glob,
        "metrics_port" => Field::Port(&[APP_PORT]),
        "metrics_path" => Field::Path(&[APP_PATH]),
        "metrics_scheme" => Field::Scheme(&[APP_SCHEME]),
        "metrics_interval" => Field::Interval(&[APP_INTERVAL]),
        "metrics_timeout" => Field::Timeout(&[APP_TIMEOUT]),
        "ecs_metrics_port" => Field::Port(&[ECS_PORT]),
        "ecs_metrics_path" => Field::Path(&[ECS_PATH]),
        "ecs_metrics_scheme" => Field::Scheme(&[ECS_SCHEME]),
        "ecs_metrics_interval" => Field::Interval(&[ECS_INTERVAL]),
        "ecs_metrics_timeout" => Field::Timeout(&[ECS_TIMEOUT]),
        // Both sources; the field of one source wins over these for it.
        "scheme" => Field::Scheme(&[APP_SCHEME, ECS_SCHEME]),
        "interval" => Field::Interval(&[APP_INTERVAL, ECS_INTERVAL]),
        "timeout" => Field::Timeout(&[APP_TIMEOUT, ECS_TIMEOUT]),
        _ => Field::NetworkMode,
    };
    Some((FIELDS[i], kind))
}

/// The network modes a task can have, as `NETWORK_MODE` names them.
pub const NETWORK_MODES: &[&str] = &["awsvpc", "bridge", "host"];

/// Parses the parameter's value. Errors name the first bad rule and field.
pub fn parse_rules(parameter: &str, raw: &str) -> Result<Rules, RulesError> {
    let value: Value = serde_json::from_str(raw).map_err(|err| RulesError::Json {
        parameter: parameter.to_owned(),
        detail: err.to_string(),
    })?;
    let Value::Array(items) = value else {
        return Err(RulesError::NotAList {
            parameter: parameter.to_owned(),
        });
    };
    let mut rules = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let Value::Object(fields) = item else {
            return Err(RulesError::NotAnObject {
                parameter: parameter.to_owned(),
                index,
            });
        };
        rules.push(parse_rule(parameter, index, fields)?);
    }
    Ok(Rules(rules))
}

fn parse_rule(
    parameter: &str,
    index: usize,
    fields: &serde_json::Map<String, Value>,
) -> Result<Rule, RulesError> {
    let bad = |field: &'static str, value: &Value, why: &str| RulesError::BadField {
        parameter: parameter.to_owned(),
        index,
        field,
        value: value.to_string(),
        why: why.to_owned(),
    };
    let mut rule = Rule {
        namespace: Glob::new("*"),
        service: Glob::new("*"),
        supplies: BTreeMap::new(),
    };
    // Per-source fields win over the shared ones (`scheme`, ...), whatever
    // their order in the object.
    let mut shared: Vec<(&'static str, String)> = Vec::new();
    for (name, value) in fields {
        let Some((name, kind)) = field(name) else {
            return Err(RulesError::UnknownField {
                parameter: parameter.to_owned(),
                index,
                field: name.clone(),
            });
        };
        let text = value.as_str().map(str::trim);
        let (tags, setting): (&[&'static str], String) = match kind {
            Field::Glob => {
                let Some(pattern) = text.filter(|t| !t.is_empty()) else {
                    return Err(bad(name, value, "is not a glob (such as \"orders-*\")"));
                };
                if name == "namespace" {
                    rule.namespace = Glob::new(pattern);
                } else {
                    rule.service = Glob::new(pattern);
                }
                continue;
            }
            Field::Port(tags) => {
                let port = match value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match port {
                    Some(p @ 1..=65535) => (tags, p.to_string()),
                    _ => return Err(bad(name, value, "is not a port (1-65535)")),
                }
            }
            Field::Path(tags) => match text {
                Some(path) if path.starts_with('/') => (tags, path.to_owned()),
                _ => return Err(bad(name, value, "is not a path starting with /")),
            },
            Field::Scheme(tags) => match text {
                Some(s @ ("http" | "https")) => (tags, s.to_owned()),
                _ => return Err(bad(name, value, "is not \"http\" or \"https\"")),
            },
            Field::Interval(tags) => {
                let ms = text.and_then(parse_prometheus_duration);
                match ms {
                    Some(ms) if u128::from(ms) >= MIN_SCRAPE_INTERVAL.as_millis() => {
                        (tags, text.unwrap_or_default().to_owned())
                    }
                    Some(_) => return Err(bad(name, value, "is shorter than 1s")),
                    None => {
                        return Err(bad(
                            name,
                            value,
                            "is not a duration string (such as \"15s\" or \"1m\")",
                        ))
                    }
                }
            }
            Field::Timeout(tags) => match text.and_then(parse_prometheus_duration) {
                Some(ms) if ms > 0 => (tags, text.unwrap_or_default().to_owned()),
                Some(_) => return Err(bad(name, value, "is zero")),
                None => {
                    return Err(bad(
                        name,
                        value,
                        "is not a duration string (such as \"10s\" or \"500ms\")",
                    ))
                }
            },
            Field::NetworkMode => match text.map(str::to_ascii_lowercase) {
                Some(mode) if NETWORK_MODES.contains(&mode.as_str()) => {
                    (&[TAG_NETWORK_MODE][..], mode)
                }
                _ => {
                    return Err(bad(
                        name,
                        value,
                        "is not \"awsvpc\", \"bridge\" or \"host\"",
                    ))
                }
            },
        };
        if tags.len() > 1 {
            shared.extend(tags.iter().map(|t| (*t, setting.clone())));
        } else {
            rule.supplies.insert(tags[0], setting);
        }
    }
    for (tag, setting) in shared {
        rule.supplies.entry(tag).or_insert(setting);
    }
    // A port alone means the usual path.
    for (port, path) in [(APP_PORT, APP_PATH), (ECS_PORT, ECS_PATH)] {
        if rule.supplies.contains_key(port) {
            rule.supplies
                .entry(path)
                .or_insert_with(|| targets::DEFAULT_METRICS_PATH.to_owned());
        }
    }
    // A timeout longer than its interval would make a collector refuse the
    // target: checked here for the rule's own pair (a tag's interval with a
    // rule's timeout is checked when targets are built).
    for (interval_tag, timeout_tag, field) in [
        (APP_INTERVAL, APP_TIMEOUT, "metrics_timeout"),
        (ECS_INTERVAL, ECS_TIMEOUT, "ecs_metrics_timeout"),
    ] {
        let (Some(interval), Some(timeout)) = (
            rule.supplies.get(interval_tag),
            rule.supplies.get(timeout_tag),
        ) else {
            continue;
        };
        let longer = parse_prometheus_duration(timeout) > parse_prometheus_duration(interval);
        if longer {
            let field = if fields.contains_key(field) {
                field
            } else {
                "timeout"
            };
            return Err(bad(
                field,
                &Value::String(timeout.clone()),
                &format!("is longer than the interval {interval:?}"),
            ));
        }
    }
    Ok(rule)
}

/// Reads and parses the rules parameter (`String` or `SecureString`).
pub async fn load(parameter: &str, ssm: &aws_sdk_ssm::Client) -> Result<Rules, RulesError> {
    match super::namespaces::read_parameter(ssm, parameter).await? {
        Some(value) => parse_rules(parameter, &value),
        None => Err(RulesError::NotFound {
            parameter: parameter.to_owned(),
        }),
    }
}

/// The discovery rules of a process, kept across leadership terms: the last
/// good rules, and what the last reading gave. In sharded mode every replica
/// reads the parameter (see [`keep_reading`]), so that a newly elected leader
/// starts from the last good rules, not from none, when the parameter is
/// refused or cannot be read at that moment.
#[derive(Clone, Debug)]
pub struct RulesKeeper {
    parameter: Arc<str>,
    state: Arc<std::sync::Mutex<Kept>>,
}

#[derive(Debug, Default)]
struct Kept {
    rules: Arc<Rules>,
    /// Rules were accepted, or the parameter refused, at least once.
    answered: bool,
    report: Option<RulesReport>,
    /// When the reading kept last started: an older one finishing later is
    /// dropped, never put over a newer one.
    read_at: Option<std::time::Instant>,
}

impl RulesKeeper {
    pub fn new(parameter: &str) -> RulesKeeper {
        RulesKeeper {
            parameter: Arc::from(parameter),
            state: Default::default(),
        }
    }

    pub fn parameter(&self) -> &str {
        &self.parameter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rules in force, whether the parameter was ever answered (rules
    /// accepted or the value refused), and the last reading's report.
    pub fn snapshot(&self) -> (Arc<Rules>, bool, Option<RulesReport>) {
        let kept = self.lock();
        (kept.rules.clone(), kept.answered, kept.report.clone())
    }

    /// Reads the parameter, keeping the last good rules when it cannot be read
    /// or is refused. A refusal is logged once, its fix once. Returns the SSM
    /// call's error, for the cycle's errors.
    pub async fn refresh(&self, ssm: &aws_sdk_ssm::Client) -> Option<String> {
        let started = std::time::Instant::now();
        let loaded = load(&self.parameter, ssm).await;
        let mut kept = self.lock();
        if kept.read_at.is_some_and(|newer| newer > started) {
            return None;
        }
        kept.read_at = Some(started);
        let last_refusal = kept.report.as_ref().and_then(|r| r.refusal.clone());
        let parameter = &*self.parameter;
        let (error, refusal, failed) = match loaded {
            Ok(rules) => {
                if *kept.rules != rules || !kept.answered {
                    tracing::info!(parameter, rules = rules.len(), "discovery rules loaded");
                    // Each service takes the new rules at its next turn.
                    kept.rules = Arc::new(rules);
                } else if last_refusal.is_some() {
                    tracing::info!(parameter, "discovery rules accepted again");
                }
                kept.answered = true;
                (None, None, None)
            }
            // Not answered: like the namespace list's, an error of the cycle;
            // a refusal stands until the parameter is read again.
            Err(err @ RulesError::Aws(_)) => {
                let message = err.to_string();
                (Some(message.clone()), last_refusal, Some(message))
            }
            Err(err) => {
                kept.answered = true;
                let message = err.to_string();
                if last_refusal.as_deref() != Some(&message) {
                    tracing::warn!(
                        parameter,
                        "{message}; the last good rules ({}) stay in force until it is fixed",
                        kept.rules.len()
                    );
                }
                (Some(message.clone()), Some(message), None)
            }
        };
        kept.report = Some(RulesReport {
            parameter: parameter.to_owned(),
            rules: kept.rules.len(),
            error,
            refusal,
        });
        failed
    }

    /// Whether the parameter was read less than `within` ago.
    fn read_within(&self, within: std::time::Duration) -> bool {
        self.lock().read_at.is_some_and(|at| at.elapsed() < within)
    }
}

/// Reads the rules every `interval` (unless the leader's discovery just did)
/// until `stop`, calling `seen` with each reading's report: what every sharded
/// replica does to keep the last good rules for when it is elected.
pub async fn keep_reading(
    keeper: RulesKeeper,
    ssm: aws_sdk_ssm::Client,
    interval: std::time::Duration,
    seen: impl Fn(&RulesReport) + Send,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if !keeper.read_within(interval) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = keeper.refresh(&ssm) => {}
            }
            if let (_, _, Some(report)) = keeper.snapshot() {
                seen(&report);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The rules in force and what became of the last reading, for the status page.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RulesReport {
    pub parameter: String,
    /// Rules in force (the last good ones).
    pub rules: usize,
    /// Why the last reading was not taken; `None` when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The parameter's value was refused (not JSON, a bad rule, missing), as
    /// opposed to not read: kept until it is read again.
    #[serde(skip)]
    pub refusal: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const P: &str = "/shard-sd/rules";

    fn err(raw: &str) -> String {
        parse_rules(P, raw).unwrap_err().to_string()
    }

    #[test]
    fn the_issue_example_parses_into_tags() {
        let rules = parse_rules(
            P,
            r#"[{"namespace": "ecs-services", "service": "orders-*", "metrics_port": 9100,
                "metrics_path": "/metrics", "ecs_metrics_port": 9779, "ecs_metrics_path": "/metrics",
                "interval": "15s", "timeout": "5s", "scheme": "http"}]"#,
        )
        .unwrap();
        let (i, rule) = rules.find("ecs-services", "orders-api").unwrap();
        assert_eq!(i, 0);
        let want: BTreeMap<&str, String> = [
            (APP_PORT, "9100"),
            (APP_PATH, "/metrics"),
            (ECS_PORT, "9779"),
            (ECS_PATH, "/metrics"),
            (APP_INTERVAL, "15s"),
            (ECS_INTERVAL, "15s"),
            (APP_TIMEOUT, "5s"),
            (ECS_TIMEOUT, "5s"),
            (APP_SCHEME, "http"),
            (ECS_SCHEME, "http"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect();
        assert_eq!(rule.supplies, want);
        assert!(rules.find("other", "orders-api").is_none());
        assert!(rules.find("ecs-services", "payments").is_none());
    }

    #[test]
    fn first_match_wins_and_defaults_match_everything() {
        let rules = parse_rules(
            P,
            r#"[{"service": "orders-*", "metrics_port": 1},
                {"metrics_port": "2", "network_mode": "BRIDGE"}]"#,
        )
        .unwrap();
        assert_eq!(rules.find("a", "orders-x").unwrap().0, 0);
        let (i, rule) = rules.find("b", "web").unwrap();
        assert_eq!(i, 1);
        assert_eq!(rule.supplies[APP_PORT], "2");
        assert_eq!(
            rule.supplies[APP_PATH], "/metrics",
            "a port alone brings /metrics"
        );
        assert_eq!(rule.supplies[TAG_NETWORK_MODE], "bridge");
        assert!(parse_rules(P, "[]").unwrap().is_empty());
    }

    #[test]
    fn tags_win_setting_by_setting() {
        let rules = parse_rules(P, r#"[{"metrics_port": 9100, "interval": "15s"}]"#).unwrap();
        let tags: BTreeMap<String, String> = [("METRICS_PORT", "8080"), ("METRICS_PATH", "/m")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let s = rules.settings("ns", "svc", &tags);
        assert_eq!(s.values["METRICS_PORT"], "8080");
        assert_eq!(s.values["METRICS_PATH"], "/m");
        assert_eq!(s.values["METRICS_INTERVAL"], "15s");
        let origin = s.rule.unwrap();
        assert_eq!(origin.index, 0);
        assert!(origin.supplied("METRICS_INTERVAL"));
        assert!(!origin.supplied("METRICS_PORT"));
        // No rule: the tags alone.
        let none = Rules::default().settings("ns", "svc", &tags);
        assert_eq!(none.values, tags);
        assert!(none.rule.is_none());
    }

    #[test]
    fn per_source_fields_win_over_shared_ones_in_any_order() {
        for raw in [
            r#"[{"ecs_metrics_scheme": "https", "scheme": "http"}]"#,
            r#"[{"scheme": "http", "ecs_metrics_scheme": "https"}]"#,
        ] {
            let rules = parse_rules(P, raw).unwrap();
            let rule = rules.find("a", "b").unwrap().1;
            assert_eq!(rule.supplies[APP_SCHEME], "http");
            assert_eq!(rule.supplies[ECS_SCHEME], "https");
        }
    }

    #[test]
    fn errors_name_the_rule_and_field() {
        assert!(err("[{").contains("not valid JSON"), "{}", err("[{"));
        assert!(err(r#"{"service": "x"}"#).contains("not a JSON list"));
        assert!(err(r#"[{"service": "x"}, 3]"#).contains("rules[1] is not a JSON object"));
        let unknown = err(r#"[{}, {"metrics_prot": 1}]"#);
        assert!(
            unknown.contains("rules[1] has unknown field \"metrics_prot\""),
            "{unknown}"
        );
        assert!(
            unknown.contains("metrics_port"),
            "lists the fields: {unknown}"
        );
        for (raw, want) in [
            (
                r#"[{"metrics_port": 70000}]"#,
                "rules[0].metrics_port = 70000 is not a port",
            ),
            (
                r#"[{"metrics_port": 0}]"#,
                "rules[0].metrics_port = 0 is not a port",
            ),
            (
                r#"[{"ecs_metrics_port": "x"}]"#,
                "rules[0].ecs_metrics_port = \"x\"",
            ),
            (r#"[{"metrics_port": 1.5}]"#, "rules[0].metrics_port = 1.5"),
            (
                r#"[{"interval": "15"}]"#,
                "rules[0].interval = \"15\" is not a duration",
            ),
            (r#"[{"interval": "500ms"}]"#, "is shorter than 1s"),
            (
                r#"[{"timeout": "0s"}]"#,
                "rules[0].timeout = \"0s\" is zero",
            ),
            (
                r#"[{"interval": "5s", "timeout": "6s"}]"#,
                "rules[0].timeout = \"6s\" is longer",
            ),
            (
                r#"[{"interval": "5s", "ecs_metrics_timeout": "6s"}]"#,
                "rules[0].ecs_metrics_timeout = \"6s\" is longer",
            ),
            (r#"[{"scheme": "ftp"}]"#, "rules[0].scheme = \"ftp\""),
            (r#"[{"metrics_path": "metrics"}]"#, "rules[0].metrics_path"),
            (r#"[{"service": ""}]"#, "rules[0].service"),
            (r#"[{"namespace": 3}]"#, "rules[0].namespace"),
            (
                r#"[{"network_mode": "nat"}]"#,
                "rules[0].network_mode = \"nat\"",
            ),
        ] {
            let got = err(raw);
            assert!(got.contains(want), "{raw}: {got}");
            assert!(got.contains(P), "names the parameter: {got}");
        }
    }

    #[test]
    fn the_deploy_example_parses() {
        let rules = parse_rules(P, include_str!("../../deploy/ecs/discovery-rules.json")).unwrap();
        assert_eq!(rules.len(), 2);
        let (_, bridge) = rules.find("legacy-ec2", "anything").unwrap();
        assert_eq!(bridge.supplies[TAG_NETWORK_MODE], "bridge");
        assert_eq!(bridge.supplies[APP_PATH], "/metrics");
    }

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| Glob::new(p).matches(n);
        assert!(m("*", ""));
        assert!(m("*", "anything"));
        assert!(m("orders-*", "orders-"));
        assert!(m("orders-*", "orders-api"));
        assert!(!m("orders-*", "order-api"));
        assert!(m("*-api", "orders-api"));
        assert!(m("o*s-*i", "orders-api"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(!m("abc", "abcd"));
        assert!(m("a**b", "ab"));
        assert!(!m("Orders", "orders"), "case-sensitive");
        assert!(m("*a*a*a*a*b", &"a".repeat(30).replace("aa", "ab")));
        assert!(!m("*a*a*a*a*a*c", &"a".repeat(5000)), "no blow-up");
    }

    /// A naive, obviously correct matcher to compare with.
    fn reference(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, _) => n.is_empty(),
            (Some('*'), _) => reference(&p[1..], n) || (!n.is_empty() && reference(p, &n[1..])),
            (Some(&c), Some(&d)) => (c == '?' || c == d) && reference(&p[1..], &n[1..]),
            (Some(_), None) => false,
        }
    }

    proptest! {
        #[test]
        fn glob_agrees_with_a_reference(p in "[abé*?]{0,8}", n in "[abé]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let nc: Vec<char> = n.chars().collect();
            prop_assert_eq!(Glob::new(&p).matches(&n), reference(&pc, &nc));
        }

        /// Rules built from every field and from values good and bad: a list
        /// that parses supplies only values a tag could hold and a collector
        /// accepts; one that does not names a rule and a field, or the list.
        #[test]
        fn parsed_rules_hold_only_valid_settings(
            rules in proptest::collection::vec(
                proptest::collection::vec(
                    (
                        proptest::sample::select(
                            FIELDS.iter().copied().chain(["metrics_prot", "port"]).collect::<Vec<_>>(),
                        ),
                        proptest::sample::select(vec![
                            json!(9100), json!("9100"), json!(0), json!(70000), json!(-1), json!(1.5),
                            json!("15s"), json!("5s"), json!("500ms"), json!("1m30s"), json!("15"),
                            json!("/metrics"), json!("metrics"), json!("http"), json!("https"),
                            json!("HTTP"), json!("bridge"), json!("host"), json!("nat"),
                            json!("orders-*"), json!(""), json!(null), json!(true), json!([1]),
                        ]),
                    ),
                    0..6,
                ),
                0..4,
            )
        ) {
            let list: Vec<Value> = rules
                .iter()
                .map(|fields| Value::Object(fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()))
                .collect();
            let raw = Value::Array(list).to_string();
            match parse_rules(P, &raw) {
                Ok(parsed) => {
                    prop_assert_eq!(parsed.len(), rules.len());
                    for rule in &parsed.0 {
                        for (tag, value) in &rule.supplies {
                            let ok = if tag.ends_with("_PORT") {
                                value.parse::<u16>().is_ok_and(|p| p > 0)
                            } else if tag.ends_with("_PATH") {
                                value.starts_with('/')
                            } else if tag.ends_with("_SCHEME") {
                                value == "http" || value == "https"
                            } else if tag.ends_with("_INTERVAL") {
                                parse_prometheus_duration(value).is_some_and(|ms| ms >= 1000)
                            } else if tag.ends_with("_TIMEOUT") {
                                parse_prometheus_duration(value).is_some_and(|ms| ms > 0)
                            } else {
                                NETWORK_MODES.contains(&value.as_str())
                            };
                            prop_assert!(ok, "{}={:?} from {}", tag, value, raw);
                        }
                        // A port brings its path.
                        for (port, path) in [(APP_PORT, APP_PATH), (ECS_PORT, ECS_PATH)] {
                            prop_assert!(!rule.supplies.contains_key(port) || rule.supplies.contains_key(path));
                        }
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(text.contains(P));
                    prop_assert!(text.contains("rules[") || text.contains("JSON"), "{}", text);
                }
            }
        }

        /// Whatever the parameter holds, parsing answers (never panics), and a
        /// rule list that parses matches deterministically.
        #[test]
        fn any_input_parses_or_names_its_fault(raw in ".{0,60}") {
            match parse_rules(P, &raw) {
                Ok(rules) => { let _ = rules.find("a", "b"); }
                Err(e) => prop_assert!(e.to_string().contains(P)),
            }
        }
    }
}
