//! Scrape targets: turning Cloud Map instances and service tags into Prometheus
//! `http_sd` target groups, and rendering them to bytes.
//!
//! This module is pure (no I/O) so that every rule of the output format — the
//! labels the original sidecar emitted, the fixes over it, the skipping of bad
//! data — is unit- and property-tested without a network. The rendered bytes are
//! deterministic: the same targets always give the same body and ETag.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

/// Instance attribute holding the task's IPv4 address (set by ECS).
pub const ATTR_IPV4: &str = "AWS_INSTANCE_IPV4";
/// Instance attribute holding the container port (set by ECS for `awsvpc` + SRV).
pub const ATTR_PORT: &str = "AWS_INSTANCE_PORT";
pub const ATTR_CLUSTER: &str = "ECS_CLUSTER_NAME";
pub const ATTR_SERVICE: &str = "ECS_SERVICE_NAME";
pub const ATTR_TASK_DEFINITION: &str = "ECS_TASK_DEFINITION_FAMILY";

pub const TAG_METRICS_PATH: &str = "METRICS_PATH";
pub const TAG_METRICS_PORT: &str = "METRICS_PORT";
pub const TAG_METRICS_SCHEME: &str = "METRICS_SCHEME";
pub const TAG_ECS_METRICS_PATH: &str = "ECS_METRICS_PATH";
pub const TAG_ECS_METRICS_PORT: &str = "ECS_METRICS_PORT";
pub const TAG_ECS_METRICS_SCHEME: &str = "ECS_METRICS_SCHEME";

/// Port used for the application target when neither the tag nor the instance names one.
pub const DEFAULT_APP_PORT: u16 = 80;

pub const LABEL_METRICS_SOURCE: &str = "metrics_source";
pub const META_PREFIX: &str = "__meta_cloudmap_";
pub const META_ATTRIBUTE_PREFIX: &str = "__meta_cloudmap_attribute_";

/// A Cloud Map instance as returned by `DiscoverInstances`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub attributes: BTreeMap<String, String>,
}

/// Everything needed to build the targets of one Cloud Map service.
#[derive(Clone, Copy, Debug)]
pub struct ServiceData<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    pub tags: &'a BTreeMap<String, String>,
    pub instances: &'a [Instance],
}

/// Which endpoint of a task a target scrapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum MetricsSource {
    #[serde(rename = "app")]
    App,
    #[serde(rename = "ecs-exporter")]
    EcsExporter,
}

impl MetricsSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MetricsSource::App => "app",
            MetricsSource::EcsExporter => "ecs-exporter",
        }
    }

    /// The tags that configure this source: (path, port, scheme).
    fn tags(self) -> (&'static str, &'static str, &'static str) {
        match self {
            MetricsSource::App => (TAG_METRICS_PATH, TAG_METRICS_PORT, TAG_METRICS_SCHEME),
            MetricsSource::EcsExporter => (
                TAG_ECS_METRICS_PATH,
                TAG_ECS_METRICS_PORT,
                TAG_ECS_METRICS_SCHEME,
            ),
        }
    }
}

/// One scrape target. Field order is the sort order of the rendered output.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    pub instance_id: String,
    pub source: MetricsSource,
    /// `ip:port`
    pub address: String,
    /// All labels, including `__metrics_path__` and `__scheme__` when set.
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// `http` unless the service's scheme tag says otherwise.
    pub fn scheme(&self) -> &str {
        self.labels
            .get("__scheme__")
            .map(String::as_str)
            .unwrap_or("http")
    }

    pub fn metrics_path(&self) -> &str {
        self.labels
            .get("__metrics_path__")
            .map(String::as_str)
            .unwrap_or("/metrics")
    }
}

/// Something wrong in Cloud Map data that made shard-sd skip a target or instance.
/// Each names the resource at fault and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Problem {
    BadPortTag {
        namespace: String,
        service: String,
        tag: &'static str,
        value: String,
    },
    BadSchemeTag {
        namespace: String,
        service: String,
        tag: &'static str,
        value: String,
    },
    BadPortAttribute {
        namespace: String,
        service: String,
        instance: String,
        value: String,
    },
    BadIpv4Attribute {
        namespace: String,
        service: String,
        instance: String,
        value: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadPortTag {
                namespace,
                service,
                tag,
                value,
            } => write!(
                f,
                "service {service:?} in namespace {namespace:?}: tag {tag}={value:?} is not a port \
                 (1-65535); its targets are skipped until the tag is fixed"
            ),
            Problem::BadSchemeTag {
                namespace,
                service,
                tag,
                value,
            } => write!(
                f,
                "service {service:?} in namespace {namespace:?}: tag {tag}={value:?} is not \
                 \"http\" or \"https\"; its targets are skipped until the tag is fixed"
            ),
            Problem::BadPortAttribute {
                namespace,
                service,
                instance,
                value,
            } => write!(
                f,
                "instance {instance:?} of service {service:?} in namespace {namespace:?}: \
                 attribute {ATTR_PORT}={value:?} is not a port (1-65535); set tag \
                 {TAG_METRICS_PORT} on the service or fix the registration"
            ),
            Problem::BadIpv4Attribute {
                namespace,
                service,
                instance,
                value,
            } => write!(
                f,
                "instance {instance:?} of service {service:?} in namespace {namespace:?}: \
                 attribute {ATTR_IPV4}={value:?} is not an IPv4 address; instance skipped"
            ),
        }
    }
}

/// The result of building targets: the targets, what was wrong, and how many
/// instances had no `AWS_INSTANCE_IPV4` at all (normal for non-ECS registrations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOutput {
    pub targets: Vec<Target>,
    pub problems: Vec<Problem>,
    pub skipped_without_ipv4: usize,
}

impl BuildOutput {
    /// Sorts and deduplicates targets and problems so output does not depend
    /// on the order in which services were read.
    pub fn finish(mut self) -> Self {
        self.targets.sort_unstable();
        self.targets.dedup();
        self.problems.sort_unstable();
        self.problems.dedup();
        self
    }
}

/// Replaces every character outside `[a-zA-Z0-9_]` by `_`, and prefixes `_` when the
/// name would start with a digit, giving a valid Prometheus label name.
pub fn sanitize_label_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

fn parse_port(value: &str) -> Option<u16> {
    match value.trim().parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    }
}

/// Port, path and scheme of one metrics source of a service, as its tags set them.
struct SourceConfig<'a> {
    source: MetricsSource,
    path: &'a str,
    /// `None`: take the instance's `AWS_INSTANCE_PORT`, else 80 (application only).
    port: Option<u16>,
    scheme: Option<&'a str>,
}

/// Reads the tags of a service into the sources it should be scraped on. A source whose
/// tags are malformed is reported and left out.
fn source_configs<'a>(svc: &ServiceData<'a>, problems: &mut Vec<Problem>) -> Vec<SourceConfig<'a>> {
    let mut out = Vec::with_capacity(2);
    for source in [MetricsSource::App, MetricsSource::EcsExporter] {
        let (path_tag, port_tag, scheme_tag) = source.tags();
        let Some(path) = svc.tags.get(path_tag) else {
            continue;
        };
        let port = match (source, svc.tags.get(port_tag)) {
            (_, Some(value)) => match parse_port(value) {
                Some(port) => Some(port),
                None => {
                    problems.push(Problem::BadPortTag {
                        namespace: svc.namespace.to_owned(),
                        service: svc.service.to_owned(),
                        tag: port_tag,
                        value: value.clone(),
                    });
                    continue;
                }
            },
            (MetricsSource::App, None) => None,
            // The exporter target needs both of its tags.
            (MetricsSource::EcsExporter, None) => continue,
        };
        let scheme = match svc.tags.get(scheme_tag).map(|s| s.trim()) {
            None => None,
            Some(s) if s == "http" || s == "https" => Some(s),
            Some(_) => {
                problems.push(Problem::BadSchemeTag {
                    namespace: svc.namespace.to_owned(),
                    service: svc.service.to_owned(),
                    tag: scheme_tag,
                    value: svc.tags[scheme_tag].clone(),
                });
                continue;
            }
        };
        out.push(SourceConfig {
            source,
            path,
            port,
            scheme,
        });
    }
    out
}

/// Builds the targets of one service and appends them to `out`.
pub fn build_service(svc: &ServiceData<'_>, out: &mut BuildOutput) {
    let sources = source_configs(svc, &mut out.problems);
    for inst in svc.instances {
        let Some(raw_ip) = inst.attributes.get(ATTR_IPV4) else {
            out.skipped_without_ipv4 += 1;
            continue;
        };
        let Ok(ip) = raw_ip.trim().parse::<Ipv4Addr>() else {
            out.problems.push(Problem::BadIpv4Attribute {
                namespace: svc.namespace.to_owned(),
                service: svc.service.to_owned(),
                instance: inst.id.clone(),
                value: raw_ip.clone(),
            });
            continue;
        };
        if sources.is_empty() {
            continue;
        }
        let ip = ip.to_string();
        let common = common_labels(svc, inst, &ip);
        for cfg in &sources {
            let port = match cfg.port {
                Some(port) => port,
                None => match inst.attributes.get(ATTR_PORT) {
                    None => DEFAULT_APP_PORT,
                    Some(value) => match parse_port(value) {
                        Some(port) => port,
                        None => {
                            out.problems.push(Problem::BadPortAttribute {
                                namespace: svc.namespace.to_owned(),
                                service: svc.service.to_owned(),
                                instance: inst.id.clone(),
                                value: value.clone(),
                            });
                            continue;
                        }
                    },
                },
            };
            let mut labels = common.clone();
            labels.insert("__metrics_path__".into(), cfg.path.to_owned());
            if let Some(scheme) = cfg.scheme {
                labels.insert("__scheme__".into(), scheme.to_owned());
            }
            labels.insert(LABEL_METRICS_SOURCE.into(), cfg.source.as_str().into());
            out.targets.push(Target {
                namespace: svc.namespace.to_owned(),
                service: svc.service.to_owned(),
                instance_id: inst.id.clone(),
                source: cfg.source,
                address: format!("{ip}:{port}"),
                labels,
            });
        }
    }
}

/// Labels shared by the application and exporter targets of one instance.
fn common_labels(svc: &ServiceData<'_>, inst: &Instance, ip: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (label, attr) in [
        ("cluster", ATTR_CLUSTER),
        ("service", ATTR_SERVICE),
        ("taskdefinition", ATTR_TASK_DEFINITION),
    ] {
        if let Some(value) = inst.attributes.get(attr) {
            labels.insert(label.to_owned(), value.clone());
        }
    }
    labels.insert("namespace".into(), svc.namespace.to_owned());
    labels.insert("taskid".into(), inst.id.clone());
    labels.insert("instance".into(), ip.to_owned());
    labels.insert(
        format!("{META_PREFIX}namespace_name"),
        svc.namespace.to_owned(),
    );
    labels.insert(format!("{META_PREFIX}service_name"), svc.service.to_owned());
    labels.insert(format!("{META_PREFIX}instance_id"), inst.id.clone());
    // Attributes are visited in name order, so when two names sanitise to the
    // same label the first in that order wins, deterministically.
    for (name, value) in &inst.attributes {
        let label = format!("{META_ATTRIBUTE_PREFIX}{}", sanitize_label_name(name));
        labels.entry(label).or_insert_with(|| value.clone());
    }
    labels
}

/// Builds and normalises the targets of many services.
pub fn build_all<'a>(services: impl IntoIterator<Item = ServiceData<'a>>) -> BuildOutput {
    let mut out = BuildOutput::default();
    for svc in services {
        build_service(&svc, &mut out);
    }
    out.finish()
}

#[derive(Serialize)]
struct GroupRef<'a> {
    targets: [&'a str; 1],
    labels: &'a BTreeMap<String, String>,
}

/// Renders targets as an `http_sd` / `file_sd` JSON document: one group per target.
pub fn render<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Vec<u8> {
    let groups: Vec<GroupRef<'_>> = targets
        .into_iter()
        .map(|t| GroupRef {
            targets: [t.address.as_str()],
            labels: &t.labels,
        })
        .collect();
    // Serialising borrowed strings and maps into a Vec cannot fail.
    serde_json::to_vec(&groups).unwrap_or_else(|_| b"[]".to_vec())
}

/// A target group as read back from `http_sd` JSON.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct Group {
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The inverse of [`render`]: targets of `http_sd` groups. Namespace, service and
/// instance come from the `__meta_cloudmap_*` labels shard-sd writes (else the
/// `namespace` / `service` labels), the source from `metrics_source`.
pub fn from_groups(groups: Vec<Group>) -> Vec<Target> {
    let label = |labels: &BTreeMap<String, String>, meta: &str, plain: &str| {
        labels
            .get(&format!("{META_PREFIX}{meta}"))
            .or_else(|| labels.get(plain))
            .cloned()
            .unwrap_or_default()
    };
    groups
        .into_iter()
        .flat_map(|g| {
            let namespace = label(&g.labels, "namespace_name", "namespace");
            let service = label(&g.labels, "service_name", "service");
            let instance_id = label(&g.labels, "instance_id", "taskid");
            let source = match g.labels.get(LABEL_METRICS_SOURCE).map(String::as_str) {
                Some("ecs-exporter") => MetricsSource::EcsExporter,
                _ => MetricsSource::App,
            };
            g.targets.into_iter().map(move |address| Target {
                namespace: namespace.clone(),
                service: service.clone(),
                instance_id: instance_id.clone(),
                source,
                address,
                labels: g.labels.clone(),
            })
        })
        .collect()
}

/// A strong ETag for a rendered body.
pub fn etag(body: &[u8]) -> String {
    format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body))
}

/// `body` gzip-compressed at the fastest level: http_sd JSON repeats itself and
/// shrinks about tenfold even so, and it is compressed once per change.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn post_instance() -> Instance {
        Instance {
            id: "0dc5c05b56df432ab6ff2f52f4019000".into(),
            attributes: tags(&[
                ("AWS_INSTANCE_IPV4", "10.10.101.12"),
                ("ECS_CLUSTER_NAME", "ecs-adot-cluster"),
                ("ECS_SERVICE_NAME", "WebAppService"),
                ("ECS_TASK_DEFINITION_FAMILY", "WebAppTask"),
            ]),
        }
    }

    fn post_tags() -> BTreeMap<String, String> {
        tags(&[
            ("METRICS_PATH", "/metrics"),
            ("METRICS_PORT", "3000"),
            ("ECS_METRICS_PATH", "/metrics"),
            ("ECS_METRICS_PORT", "9779"),
        ])
    }

    const POST_EXAMPLE: &str = r#"[
       { "targets":[ "10.10.101.12:3000" ],
         "labels":{ "__metrics_path__":"/metrics", "cluster":"ecs-adot-cluster",
            "instance":"10.10.101.12", "service":"WebAppService", "namespace": "ecs-services",
            "taskdefinition":"WebAppTask", "taskid":"0dc5c05b56df432ab6ff2f52f4019000" } },
       { "targets":[ "10.10.101.12:9779" ],
         "labels":{ "__metrics_path__":"/metrics", "cluster":"ecs-adot-cluster",
            "instance":"10.10.101.12", "service":"WebAppService", "namespace": "ecs-services",
            "taskdefinition":"WebAppTask", "taskid":"0dc5c05b56df432ab6ff2f52f4019000" } }
    ]"#;

    #[test]
    fn reproduces_the_post_example() {
        let tags = post_tags();
        let instances = [post_instance()];
        let out = build_all([ServiceData {
            namespace: "ecs-services",
            service: "webapp-svc",
            tags: &tags,
            instances: &instances,
        }]);
        assert!(out.problems.is_empty());
        let mut rendered: serde_json::Value =
            serde_json::from_slice(&render(&out.targets)).unwrap();
        // Strip what shard-sd adds over the original; the rest must match exactly.
        let mut sources = Vec::new();
        for group in rendered.as_array_mut().unwrap() {
            let labels = group["labels"].as_object_mut().unwrap();
            sources.push(labels.remove(LABEL_METRICS_SOURCE).unwrap());
            labels.retain(|k, _| !k.starts_with(META_PREFIX));
        }
        let expected: serde_json::Value = serde_json::from_str(POST_EXAMPLE).unwrap();
        assert_eq!(rendered, expected);
        assert_eq!(sources, ["app", "ecs-exporter"]);
    }

    #[test]
    fn adds_meta_labels_for_every_attribute() {
        let tags = post_tags();
        let mut inst = post_instance();
        inst.attributes
            .insert("AVAILABILITY_ZONE".into(), "us-east-1a".into());
        inst.attributes.insert("my-attr.x".into(), "v".into());
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[inst],
        }]);
        let labels = &out.targets[0].labels;
        assert_eq!(labels["__meta_cloudmap_namespace_name"], "ns");
        assert_eq!(labels["__meta_cloudmap_service_name"], "svc");
        assert_eq!(
            labels["__meta_cloudmap_instance_id"],
            "0dc5c05b56df432ab6ff2f52f4019000"
        );
        assert_eq!(
            labels["__meta_cloudmap_attribute_AVAILABILITY_ZONE"],
            "us-east-1a"
        );
        assert_eq!(labels["__meta_cloudmap_attribute_my_attr_x"], "v");
        assert_eq!(
            labels["__meta_cloudmap_attribute_AWS_INSTANCE_IPV4"],
            "10.10.101.12"
        );
    }

    #[test]
    fn app_port_falls_back_to_instance_port_then_80() {
        let tags = tags(&[("METRICS_PATH", "/m")]);
        let mut with_port = post_instance();
        with_port.attributes.insert(ATTR_PORT.into(), "8080".into());
        let mut without = post_instance();
        without.id = "other".into();
        without
            .attributes
            .insert(ATTR_IPV4.into(), "10.0.0.2".into());
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[with_port, without],
        }]);
        let addrs: Vec<_> = out.targets.iter().map(|t| t.address.as_str()).collect();
        assert_eq!(addrs, ["10.10.101.12:8080", "10.0.0.2:80"]);
        // No exporter tags: no exporter target.
        assert!(out.targets.iter().all(|t| t.source == MetricsSource::App));
    }

    #[test]
    fn exporter_needs_both_tags() {
        let tags = tags(&[("ECS_METRICS_PATH", "/metrics")]);
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[post_instance()],
        }]);
        assert!(out.targets.is_empty());
        assert!(out.problems.is_empty());
    }

    #[test]
    fn bad_port_tag_is_reported_and_only_that_target_skipped() {
        let mut tags = post_tags();
        tags.insert("METRICS_PORT".into(), "http".into());
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[post_instance()],
        }]);
        assert_eq!(out.targets.len(), 1);
        assert_eq!(out.targets[0].source, MetricsSource::EcsExporter);
        assert_eq!(out.problems.len(), 1);
        let msg = out.problems[0].to_string();
        assert!(
            msg.contains("\"svc\"") && msg.contains("METRICS_PORT"),
            "{msg}"
        );
        for bad in ["0", "65536", "-1", "", "30 00"] {
            tags.insert("METRICS_PORT".into(), bad.into());
            let out = build_all([ServiceData {
                namespace: "ns",
                service: "svc",
                tags: &tags,
                instances: &[post_instance()],
            }]);
            assert_eq!(out.targets.len(), 1, "port {bad:?}");
        }
    }

    #[test]
    fn scheme_tags_set_scheme_label() {
        let mut tags = post_tags();
        tags.insert("METRICS_SCHEME".into(), "https".into());
        tags.insert("ECS_METRICS_SCHEME".into(), "gopher".into());
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[post_instance()],
        }]);
        assert_eq!(out.targets.len(), 1);
        assert_eq!(out.targets[0].labels["__scheme__"], "https");
        assert_eq!(out.targets[0].scheme(), "https");
        assert!(matches!(
            out.problems[0],
            Problem::BadSchemeTag {
                tag: "ECS_METRICS_SCHEME",
                ..
            }
        ));
    }

    #[test]
    fn instances_without_ipv4_are_counted_and_bad_ipv4_reported() {
        let tags = post_tags();
        let mut no_ip = post_instance();
        no_ip.attributes.remove(ATTR_IPV4);
        let mut bad_ip = post_instance();
        bad_ip
            .attributes
            .insert(ATTR_IPV4.into(), "10.0.0.300".into());
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[no_ip, bad_ip],
        }]);
        assert!(out.targets.is_empty());
        assert_eq!(out.skipped_without_ipv4, 1);
        assert!(matches!(out.problems[0], Problem::BadIpv4Attribute { .. }));
    }

    #[test]
    fn labels_absent_when_attributes_absent() {
        let tags = post_tags();
        let inst = Instance {
            id: "i".into(),
            attributes: tags_of_ip("10.0.0.1"),
        };
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &[inst],
        }]);
        for t in &out.targets {
            for absent in ["cluster", "service", "taskdefinition", "__scheme__"] {
                assert!(!t.labels.contains_key(absent), "{absent}");
            }
        }
    }

    fn tags_of_ip(ip: &str) -> BTreeMap<String, String> {
        tags(&[(ATTR_IPV4, ip)])
    }

    #[test]
    fn rendered_targets_read_back_the_same() {
        let tags = post_tags();
        let out = build_all([ServiceData {
            namespace: "ecs-services",
            service: "webapp-svc",
            tags: &tags,
            instances: &[post_instance()],
        }]);
        let groups: Vec<Group> = serde_json::from_slice(&render(&out.targets)).unwrap();
        let mut back = from_groups(groups);
        back.sort();
        assert_eq!(back, out.targets);
    }

    #[test]
    fn etag_changes_with_body() {
        assert_eq!(etag(b"[]"), etag(b"[]"));
        assert_ne!(etag(b"[]"), etag(b"[ ]"));
        assert!(etag(b"x").starts_with('"') && etag(b"x").ends_with('"'));
    }

    fn valid_label_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn arb_instance() -> impl Strategy<Value = Instance> {
        (
            "[a-z0-9]{1,8}",
            proptest::collection::btree_map("[A-Za-z0-9_.:/ -]{1,12}", ".{0,8}", 0..5),
            proptest::option::of((0u8..=255, 0u8..=255)),
            proptest::option::of("[0-9a-z]{0,6}"),
        )
            .prop_map(|(id, mut attributes, ip, port)| {
                if let Some((a, b)) = ip {
                    attributes.insert(ATTR_IPV4.into(), format!("10.0.{a}.{b}"));
                }
                if let Some(port) = port {
                    attributes.insert(ATTR_PORT.into(), port);
                }
                Instance { id, attributes }
            })
    }

    fn arb_tags() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map(
            prop_oneof![
                Just(TAG_METRICS_PATH.to_string()),
                Just(TAG_METRICS_PORT.to_string()),
                Just(TAG_METRICS_SCHEME.to_string()),
                Just(TAG_ECS_METRICS_PATH.to_string()),
                Just(TAG_ECS_METRICS_PORT.to_string()),
                Just(TAG_ECS_METRICS_SCHEME.to_string()),
                "[A-Z]{1,5}",
            ],
            prop_oneof![
                Just("/metrics".to_string()),
                "[0-9]{1,6}",
                Just("https".to_string()),
                ".{0,6}"
            ],
            0..6,
        )
    }

    proptest! {
        #[test]
        fn sanitised_names_are_valid_and_stable(name in ".{0,24}") {
            let once = sanitize_label_name(&name);
            prop_assert!(valid_label_name(&once), "{once:?}");
            prop_assert_eq!(sanitize_label_name(&once), once.clone());
            if valid_label_name(&name) {
                prop_assert_eq!(once, name);
            }
        }

        #[test]
        fn every_label_name_is_valid_and_output_is_order_independent(
            tags in arb_tags(),
            mut instances in proptest::collection::vec(arb_instance(), 0..8),
        ) {
            let svc = ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances };
            let out = build_all([svc]);
            for t in &out.targets {
                for name in t.labels.keys() {
                    prop_assert!(valid_label_name(name), "{name:?}");
                }
                let (ip, port) = t.address.rsplit_once(':').unwrap();
                prop_assert!(ip.parse::<Ipv4Addr>().is_ok());
                prop_assert!(port.parse::<u16>().map(|p| p > 0).unwrap_or(false));
                prop_assert_eq!(&t.labels["instance"], ip);
            }
            // At most two targets per instance, and only instances with an IPv4.
            prop_assert!(out.targets.len() <= 2 * instances.len());
            let body = render(&out.targets);
            instances.reverse();
            let again = build_all([ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances }]);
            prop_assert_eq!(render(&again.targets), body);
        }
    }
}
