//! Scrape targets: turning Cloud Map instances and service tags into Prometheus
//! `http_sd` target groups, and rendering them to bytes.
//!
//! This module is pure (no I/O) so that every rule of the output format — the
//! labels the original sidecar emitted, the fixes over it, the skipping of bad
//! data — is unit- and property-tested without a network. The rendered bytes are
//! deterministic: the same targets always give the same body and ETag.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

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
pub const TAG_METRICS_INTERVAL: &str = "METRICS_INTERVAL";
pub const TAG_METRICS_TIMEOUT: &str = "METRICS_TIMEOUT";
pub const TAG_ECS_METRICS_PATH: &str = "ECS_METRICS_PATH";
pub const TAG_ECS_METRICS_PORT: &str = "ECS_METRICS_PORT";
pub const TAG_ECS_METRICS_SCHEME: &str = "ECS_METRICS_SCHEME";
pub const TAG_ECS_METRICS_INTERVAL: &str = "ECS_METRICS_INTERVAL";
pub const TAG_ECS_METRICS_TIMEOUT: &str = "ECS_METRICS_TIMEOUT";
/// The ECS network mode of a service's tasks: `awsvpc` (the default), `bridge`
/// or `host`. In bridge mode a container port is reached through a host port
/// that ECS picks, which only ECS `DescribeTasks` tells.
pub const TAG_NETWORK_MODE: &str = "NETWORK_MODE";

/// The timeout a service's interval brings when its timeout is not tagged:
/// Prometheus's default, or the interval when shorter. A collector refuses a
/// target whose timeout exceeds its interval, and the job's own timeout may.
pub const DEFAULT_TIMEOUT_CAP: std::time::Duration = std::time::Duration::from_secs(10);
/// The shortest interval a tag may set: below it is almost surely a typo
/// (`1ms` for `1m`) that would have every collector scrape without pause.
pub const MIN_SCRAPE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Port used for the application target when neither the tag nor the instance names one.
pub const DEFAULT_APP_PORT: u16 = 80;

pub const LABEL_METRICS_SOURCE: &str = "metrics_source";
pub const META_PREFIX: &str = "__meta_cloudmap_";
pub const META_ATTRIBUTE_PREFIX: &str = "__meta_cloudmap_attribute_";

/// A Cloud Map instance as returned by `DiscoverInstances`. Discovery keeps it
/// behind an `Arc`, and every target built from it points at it: its strings
/// exist once, however many targets, cycles and shards refer to them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Instance {
    pub id: Arc<str>,
    pub attributes: Attributes,
}

/// An instance's attributes: sorted by name, names unique, strings shared (see
/// [`Interner`]). A boxed slice costs a third of what a map of the same pairs does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Attributes(Box<[(Arc<str>, Arc<str>)]>);

impl Attributes {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// (name, value) pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (&**n, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `name` to `value` (a rebuild: for tests and small edits).
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) {
        let mut pairs = std::mem::take(&mut self.0).into_vec();
        let name = name.into();
        pairs.retain(|(n, _)| *n != name);
        pairs.push((name, value.into()));
        *self = Attributes::from_pairs(pairs);
    }

    pub fn remove(&mut self, name: &str) {
        let mut pairs = std::mem::take(&mut self.0).into_vec();
        pairs.retain(|(n, _)| &**n != name);
        self.0 = pairs.into_boxed_slice();
    }

    /// From pairs in any order; of repeated names the last wins, as in a map.
    fn from_pairs(mut pairs: Vec<(Arc<str>, Arc<str>)>) -> Self {
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Attributes(pairs.into_boxed_slice())
    }
}

impl<K: Into<Arc<str>>, V: Into<Arc<str>>> FromIterator<(K, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Attributes::from_pairs(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// One shared copy of each string seen: attribute names, and values repeated
/// across instances (cluster, service, task definition, zone), are held once
/// however many instances carry them. [`Interner::prune`] forgets the strings
/// nothing else holds any more.
#[derive(Debug, Default)]
pub struct Interner {
    /// Keyed SipHash: strings from AWS or peers cannot be chosen to collide.
    strings: std::collections::HashSet<Arc<str>>,
    /// Scrape settings, shared by the targets of one service and source.
    scrapes: std::collections::HashSet<Arc<Scrape>>,
    /// Size after the last prune.
    kept: usize,
}

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(s);
        self.strings.insert(shared.clone());
        shared
    }

    /// A path and scheme shared by every target that has them.
    pub fn scrape(&mut self, path: &str, scheme: Option<&'static str>) -> Arc<Scrape> {
        let wanted = Scrape::path_and_scheme(self.get(path), scheme);
        if let Some(shared) = self.scrapes.get(&wanted) {
            return shared.clone();
        }
        let shared = Arc::new(wanted);
        self.scrapes.insert(shared.clone());
        shared
    }

    /// An instance with its strings shared.
    pub fn instance<'a>(
        &mut self,
        id: &str,
        attributes: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Instance {
        let pairs = attributes
            .into_iter()
            .map(|(k, v)| (self.get(k), self.get(v)))
            .collect();
        Instance {
            id: self.get(id),
            attributes: Attributes::from_pairs(pairs),
        }
    }

    /// Forgets the strings only this interner holds, once it has doubled since the
    /// last prune (so the cost stays proportional to what was added).
    pub fn prune(&mut self) {
        if self.strings.len() > 2 * self.kept.max(1024) {
            self.scrapes.retain(|s| Arc::strong_count(s) > 1);
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.kept = self.strings.len();
        }
    }

    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

/// Everything needed to build the targets of one Cloud Map service.
#[derive(Clone, Copy, Debug)]
pub struct ServiceData<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    /// Its settings by tag name: its tags, and what a discovery rule supplies.
    pub tags: &'a BTreeMap<String, String>,
    pub instances: &'a [Arc<Instance>],
    /// The discovery rule that supplied some settings: its index and those
    /// settings (tag names), for the problems to say where a value came from.
    pub rule: Option<(usize, &'a [&'static str])>,
    /// For bridge-mode tasks: the host port of an instance's container port.
    pub host_ports: Option<HostPorts<'a>>,
}

impl<'a> ServiceData<'a> {
    /// A service configured by its tags alone, its tasks in `awsvpc` or `host` mode.
    pub fn tagged(
        namespace: &'a str,
        service: &'a str,
        tags: &'a BTreeMap<String, String>,
        instances: &'a [Arc<Instance>],
    ) -> Self {
        ServiceData {
            namespace,
            service,
            tags,
            instances,
            rule: None,
            host_ports: None,
        }
    }

    /// Setting `tag` as a problem names it: the tag, or the rule that supplied it.
    fn named(&self, tag: &str) -> String {
        match self.origin(tag) {
            None => tag.to_owned(),
            Some(i) => format!("{tag} (from discovery rule {i})"),
        }
    }

    /// The rule that supplied setting `tag`, if not a tag.
    fn origin(&self, tag: &str) -> Option<usize> {
        self.rule
            .filter(|(_, settings)| settings.contains(&tag))
            .map(|(index, _)| index)
    }
}

/// The ECS network mode of a service's tasks ([`TAG_NETWORK_MODE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// Each task has its own address: a container port is reached there.
    #[default]
    Awsvpc,
    /// Tasks share their host's address; ECS maps each container port to a
    /// host port of its choosing.
    Bridge,
    /// Tasks share their host's address and network: a container port is the
    /// host port. The ECS agent reports no port bindings for these tasks.
    Host,
}

impl NetworkMode {
    /// The mode a service's settings name; `Err` with the value when it names
    /// none (the service then counts as `awsvpc`).
    pub fn of(tags: &BTreeMap<String, String>) -> Result<NetworkMode, &str> {
        match tags.get(TAG_NETWORK_MODE).map(|v| v.trim()) {
            None => Ok(NetworkMode::Awsvpc),
            Some(v) if v.eq_ignore_ascii_case("awsvpc") => Ok(NetworkMode::Awsvpc),
            Some(v) if v.eq_ignore_ascii_case("bridge") => Ok(NetworkMode::Bridge),
            Some(v) if v.eq_ignore_ascii_case("host") => Ok(NetworkMode::Host),
            Some(v) => Err(v),
        }
    }
}

/// Finds the host port that an instance's (task's) container port is bound to.
#[derive(Clone, Copy)]
pub struct HostPorts<'a>(pub &'a (dyn Fn(&Instance, u16) -> Result<u16, NoHostPort> + Sync));

impl fmt::Debug for HostPorts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostPorts")
    }
}

/// Why a bridge-mode task's container port has no host port to scrape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoHostPort {
    /// The task has no TCP binding of that container port.
    NotBound,
    /// Several containers bind it, to different host ports.
    Ambiguous(Vec<u16>),
    /// ECS does not know the task in the instance's cluster.
    TaskNotFound { cluster: String },
    /// The instance has no `ECS_CLUSTER_NAME` attribute to ask ECS with.
    NoCluster,
    /// The instance id is no ECS task id: the instance was not registered by ECS.
    NotATask,
    /// ECS could not be asked (the error), or has not answered yet.
    Unknown(String),
}

/// The ports of a task in bridge mode, as ECS `DescribeTasks` reports its
/// containers' TCP network bindings: a container port, or a range of them, and
/// the host port of its first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskPorts {
    bindings: Vec<PortBinding>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PortBinding {
    /// IPv4 bindings first: the address a task is registered at is IPv4.
    ipv6: bool,
    container_first: u16,
    container_last: u16,
    host_first: u16,
}

impl TaskPorts {
    /// Adds a binding of container ports `container` (one, or a range) to host
    /// ports from `host_first`, on IPv6 or IPv4. A range that would run past
    /// the last port is not added.
    pub fn bind(&mut self, container: (u16, u16), host_first: u16, ipv6: bool) {
        let (first, last) = container;
        if first == 0
            || host_first == 0
            || last < first
            || host_first.checked_add(last - first).is_none()
        {
            return;
        }
        let binding = PortBinding {
            ipv6,
            container_first: first,
            container_last: last,
            host_first,
        };
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
            self.bindings.sort_unstable();
        }
    }

    /// The host port `container_port` is bound to, on IPv4 when it is bound
    /// there (IPv6 otherwise). The same host port listed twice is one;
    /// different ones are ambiguous.
    pub fn host_port(&self, container_port: u16) -> Result<u16, NoHostPort> {
        let binds =
            |b: &&PortBinding| (b.container_first..=b.container_last).contains(&container_port);
        let ipv6 = !self.bindings.iter().filter(binds).any(|b| !b.ipv6);
        let mut found: Vec<u16> = self
            .bindings
            .iter()
            .filter(binds)
            .filter(|b| b.ipv6 == ipv6)
            .map(|b| b.host_first + (container_port - b.container_first))
            .collect();
        found.sort_unstable();
        found.dedup();
        match found[..] {
            [] => Err(NoHostPort::NotBound),
            [port] => Ok(port),
            _ => Err(NoHostPort::Ambiguous(found)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }
}

/// Which endpoint of a task a target scrapes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
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

    /// The tags that configure this source.
    fn tags(self) -> SourceTags {
        match self {
            MetricsSource::App => SourceTags {
                path: TAG_METRICS_PATH,
                port: TAG_METRICS_PORT,
                scheme: TAG_METRICS_SCHEME,
                interval: TAG_METRICS_INTERVAL,
                timeout: TAG_METRICS_TIMEOUT,
            },
            MetricsSource::EcsExporter => SourceTags {
                path: TAG_ECS_METRICS_PATH,
                port: TAG_ECS_METRICS_PORT,
                scheme: TAG_ECS_METRICS_SCHEME,
                interval: TAG_ECS_METRICS_INTERVAL,
                timeout: TAG_ECS_METRICS_TIMEOUT,
            },
        }
    }
}

/// The names of the tags that configure one metrics source.
struct SourceTags {
    path: &'static str,
    port: &'static str,
    scheme: &'static str,
    interval: &'static str,
    timeout: &'static str,
}

/// Which `__meta_cloudmap_*` labels a replica's http_sd and file_sd bodies carry
/// (`META_LABELS`). They are for relabelling only, and Prometheus drops them
/// after it; at two thirds of a body's bytes, a user who does not relabel on them
/// saves both the bytes and the collector's work of parsing them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetaLabels {
    /// Every one: namespace, service, instance id and one per instance attribute.
    #[default]
    All,
    /// Namespace, service and instance id; no attribute labels.
    Basic,
    /// None at all.
    None,
}

impl MetaLabels {
    pub const NAMES: &'static [&'static str] = &["all", "basic", "none"];

    pub fn from_name(name: &str) -> Option<MetaLabels> {
        let all = [MetaLabels::All, MetaLabels::Basic, MetaLabels::None];
        let i = Self::NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))?;
        Some(all[i])
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MetaLabels::All => "all",
            MetaLabels::Basic => "basic",
            MetaLabels::None => "none",
        }
    }

    /// Whether a label of this name is written.
    fn keeps(self, name: &LabelName<'_>) -> bool {
        match self {
            MetaLabels::All => true,
            MetaLabels::Basic => !name.starts_with(META_ATTRIBUTE_PREFIX),
            MetaLabels::None => !name.starts_with(META_PREFIX),
        }
    }
}

/// How the targets of one source of one service are scraped, as the service's
/// tags say: shared by all of them. Durations are as tagged (checked to be
/// Prometheus durations, the timeout no longer than the interval).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scrape {
    pub path: Arc<str>,
    pub scheme: Option<&'static str>,
    /// `__scrape_interval__`: `None` keeps the job's.
    pub interval: Option<Arc<str>>,
    /// `__scrape_timeout__`: `None` keeps the job's.
    pub timeout: Option<Arc<str>>,
}

impl Scrape {
    /// Only a path and a scheme, the rest the job's.
    pub fn path_and_scheme(path: Arc<str>, scheme: Option<&'static str>) -> Scrape {
        Scrape {
            path,
            scheme,
            interval: None,
            timeout: None,
        }
    }

    /// Whether it sets more than a path and a scheme.
    pub fn has_timing(&self) -> bool {
        self.interval.is_some() || self.timeout.is_some()
    }
}

/// The scheme of a target that names none, as Prometheus scrapes it.
pub const DEFAULT_SCHEME: &str = "http";
/// The metrics path of a target given without `__metrics_path__`.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";

/// One scrape target. Cheap to clone: its strings are shared, and the labels of a
/// discovered target are not stored at all but derived, when rendered, from the
/// instance it points at and its service's tags.
///
/// Equality and order are those of (namespace, service, instance id, source,
/// address, labels), the labels compared as the name-sorted pairs they render
/// to, so a target read back from http_sd equals the one it was rendered from.
/// Targets are made by [`build_all`], [`from_groups`] or [`Target::new`] and then
/// only read: their content hash is computed when they are made.
#[derive(Clone, Debug)]
pub struct Target {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    pub instance_id: Arc<str>,
    pub source: MetricsSource,
    /// `ip:port`
    pub address: Arc<str>,
    labels: Labels,
    /// XXH3 of everything above, labels as rendered: unequal targets almost
    /// always differ here, so comparing them rarely has to look at their labels.
    content: u64,
}

#[derive(Clone, Debug)]
enum Labels {
    /// A discovered target: derived from its instance and its source's tags.
    Derived {
        instance: Arc<Instance>,
        scrape: Arc<Scrape>,
    },
    /// A target read back from http_sd JSON (`plan`, a mirrored assignment): the
    /// labels as given, sorted by name.
    Given(Arc<[(Arc<str>, Arc<str>)]>),
}

/// A label name as rendered: a fixed prefix and the rest (an attribute's name,
/// sanitised), so that names are compared and written without being built.
#[derive(Clone, Debug)]
pub struct LabelName<'a> {
    prefix: &'static str,
    rest: Cow<'a, str>,
}

impl LabelName<'_> {
    fn parts(&self) -> [&[u8]; 2] {
        [self.prefix.as_bytes(), self.rest.as_bytes()]
    }

    fn is(&self, name: &str) -> bool {
        name.len() == self.prefix.len() + self.rest.len()
            && name.starts_with(self.prefix)
            && name[self.prefix.len()..] == *self.rest
    }

    /// Whether the name begins with `start`.
    fn starts_with(&self, start: &str) -> bool {
        match start.strip_prefix(self.prefix) {
            Some(rest) => self.rest.starts_with(rest),
            None => self.prefix.starts_with(start),
        }
    }
}

impl std::fmt::Display for LabelName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.prefix, self.rest)
    }
}

impl PartialEq for LabelName<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for LabelName<'_> {}

impl PartialOrd for LabelName<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LabelName<'_> {
    /// As the concatenated names compare, a run of bytes at a time.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self.parts(), other.parts());
        let (mut ia, mut oa, mut ib, mut ob) = (0, 0, 0, 0);
        loop {
            while ia < 2 && oa == a[ia].len() {
                ia += 1;
                oa = 0;
            }
            while ib < 2 && ob == b[ib].len() {
                ib += 1;
                ob = 0;
            }
            let (sa, sb) = match (a.get(ia), b.get(ib)) {
                (None, None) => return std::cmp::Ordering::Equal,
                (None, Some(_)) => return std::cmp::Ordering::Less,
                (Some(_), None) => return std::cmp::Ordering::Greater,
                (Some(sa), Some(sb)) => (&sa[oa..], &sb[ob..]),
            };
            let n = sa.len().min(sb.len());
            match sa[..n].cmp(&sb[..n]) {
                std::cmp::Ordering::Equal => {
                    oa += n;
                    ob += n;
                }
                unequal => return unequal,
            }
        }
    }
}

const fn fixed(name: &'static str) -> LabelName<'static> {
    LabelName {
        prefix: name,
        rest: Cow::Borrowed(""),
    }
}

impl Target {
    /// A target with the given labels (`plan`, tests).
    pub fn new(
        namespace: &str,
        service: &str,
        instance_id: &str,
        source: MetricsSource,
        address: &str,
        labels: BTreeMap<String, String>,
    ) -> Target {
        let labels: Vec<(Arc<str>, Arc<str>)> = labels
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect();
        Target::given(
            namespace.into(),
            service.into(),
            instance_id.into(),
            source,
            address.into(),
            labels.into(),
        )
    }

    fn given(
        namespace: Arc<str>,
        service: Arc<str>,
        instance_id: Arc<str>,
        source: MetricsSource,
        address: Arc<str>,
        labels: Arc<[(Arc<str>, Arc<str>)]>,
    ) -> Target {
        Target {
            namespace,
            service,
            instance_id,
            source,
            address,
            labels: Labels::Given(labels),
            content: 0,
        }
        .with_content()
    }

    fn with_content(mut self) -> Target {
        // Every field framed by its length: no two different targets feed the
        // same bytes, whatever their strings hold.
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut field = |parts: &[&str]| {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            h.update(&(len as u64).to_le_bytes());
            for part in parts {
                h.update(part.as_bytes());
            }
        };
        for part in [
            &*self.namespace,
            &*self.service,
            &*self.instance_id,
            self.source.as_str(),
            &*self.address,
        ] {
            field(&[part]);
        }
        self.for_each_label(|name, value| {
            field(&[name.prefix, &name.rest]);
            field(&[value]);
        });
        self.content = h.digest();
        self
    }

    /// A target as a peer sent it: its fields, and its labels as rendered (sorted
    /// by name, names unique, else `None`), strings shared through `strings`. It
    /// renders to the very bytes, and has the content hash, of the one sent.
    pub fn from_parts(
        strings: &mut Interner,
        namespace: &str,
        service: &str,
        instance_id: &str,
        source: MetricsSource,
        address: &str,
        labels: &[(String, String)],
    ) -> Option<Target> {
        if labels.windows(2).any(|w| w[0].0 >= w[1].0) {
            return None;
        }
        let labels: Arc<[(Arc<str>, Arc<str>)]> = labels
            .iter()
            .map(|(k, v)| (strings.get(k), strings.get(v)))
            .collect();
        Some(Target::given(
            strings.get(namespace),
            strings.get(service),
            strings.get(instance_id),
            source,
            strings.get(address),
            labels,
        ))
    }

    /// A discovered target as a peer sent it: its fields, its instance and its
    /// source's path and scheme (`http` or `https`, else `None`), strings shared
    /// through `strings`. It renders to the very bytes, and has the content hash,
    /// of the one sent, and holds its instance's attributes rather than every
    /// label.
    #[allow(clippy::too_many_arguments)]
    pub fn from_instance(
        strings: &mut Interner,
        namespace: &str,
        service: &str,
        source: MetricsSource,
        address: &str,
        instance: Instance,
        path: &str,
        scheme: Option<&str>,
    ) -> Option<Target> {
        let scheme = match scheme {
            None => None,
            Some("http") => Some("http"),
            Some("https") => Some("https"),
            Some(_) => return None,
        };
        Some(
            Target {
                namespace: strings.get(namespace),
                service: strings.get(service),
                instance_id: instance.id.clone(),
                source,
                address: strings.get(address),
                labels: Labels::Derived {
                    instance: Arc::new(instance),
                    scrape: strings.scrape(path, scheme),
                },
                content: 0,
            }
            .with_content(),
        )
    }

    /// A discovered target's instance and scrape settings; `None` for one with
    /// labels given (read back from http_sd or sent so).
    pub fn derived_from(&self) -> Option<(&Instance, &Scrape)> {
        match &self.labels {
            Labels::Derived { instance, scrape } => Some((instance, scrape)),
            Labels::Given(_) => None,
        }
    }

    /// The same target with one more label (or one replaced): a relabelled copy.
    pub fn with_label(&self, name: &str, value: &str) -> Target {
        let mut labels = self.label_map();
        labels.insert(name.to_owned(), value.to_owned());
        Target::new(
            &self.namespace,
            &self.service,
            &self.instance_id,
            self.source,
            &self.address,
            labels,
        )
    }

    /// A hash of the whole target, labels included: equal targets have equal ones.
    pub fn content_hash(&self) -> u64 {
        self.content
    }

    /// The labels as rendered, sorted by name, names unique.
    pub fn labels(&self) -> Vec<(LabelName<'_>, &str)> {
        let mut out = Vec::with_capacity(16);
        self.for_each_label(|name, value| out.push((name.clone(), value)));
        out
    }

    /// Visits the labels as rendered, sorted by name, names unique, without
    /// building a list: a discovered target's attribute labels all sort before its
    /// fixed ones (`__meta_cloudmap_attribute_` before `__meta_cloudmap_instance_id`),
    /// and they are in order already when every attribute name is a valid label
    /// name (ECS's are); otherwise they are sorted, and of two names that
    /// sanitise to one label the first in name order wins.
    pub fn for_each_label<'a>(&'a self, mut visit: impl FnMut(&LabelName<'a>, &'a str)) {
        let (instance, scrape) = match &self.labels {
            Labels::Given(pairs) => {
                for (name, value) in pairs.iter() {
                    let name = LabelName {
                        prefix: "",
                        rest: Cow::Borrowed(&**name),
                    };
                    visit(&name, value);
                }
                return;
            }
            Labels::Derived { instance, scrape } => (instance, scrape),
        };
        let attrs = &instance.attributes;
        let attribute = |name: &'a str| LabelName {
            prefix: META_ATTRIBUTE_PREFIX,
            rest: sanitized(name),
        };
        if attrs.iter().all(|(name, _)| is_label_name(name)) {
            for (name, value) in attrs.iter() {
                visit(&attribute(name), value);
            }
        } else {
            let mut named: Vec<(LabelName<'a>, &'a str)> =
                attrs.iter().map(|(n, v)| (attribute(n), v)).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named.dedup_by(|later, first| later.0 == first.0);
            for (name, value) in &named {
                visit(name, value);
            }
        }
        let ip = self
            .address
            .rsplit_once(':')
            .map_or(&*self.address, |(ip, _)| ip);
        let optional = |attr: &str| attrs.get(attr);
        // In name order.
        visit(&fixed("__meta_cloudmap_instance_id"), &instance.id);
        visit(&fixed("__meta_cloudmap_namespace_name"), &self.namespace);
        visit(&fixed("__meta_cloudmap_service_name"), &self.service);
        visit(&fixed("__metrics_path__"), &scrape.path);
        if let Some(scheme) = scrape.scheme {
            visit(&fixed("__scheme__"), scheme);
        }
        if let Some(interval) = &scrape.interval {
            visit(&fixed("__scrape_interval__"), interval);
        }
        if let Some(timeout) = &scrape.timeout {
            visit(&fixed("__scrape_timeout__"), timeout);
        }
        if let Some(cluster) = optional(ATTR_CLUSTER) {
            visit(&fixed("cluster"), cluster);
        }
        visit(&fixed("instance"), ip);
        visit(&fixed(LABEL_METRICS_SOURCE), self.source.as_str());
        visit(&fixed("namespace"), &self.namespace);
        if let Some(service) = optional(ATTR_SERVICE) {
            visit(&fixed("service"), service);
        }
        if let Some(family) = optional(ATTR_TASK_DEFINITION) {
            visit(&fixed("taskdefinition"), family);
        }
        visit(&fixed("taskid"), &instance.id);
    }

    /// The value of label `name`, if set.
    pub fn label(&self, name: &str) -> Option<&str> {
        if let Labels::Given(pairs) = &self.labels {
            return pairs
                .binary_search_by(|(n, _)| (**n).cmp(name))
                .ok()
                .map(|i| &*pairs[i].1);
        }
        self.labels()
            .into_iter()
            .find(|(n, _)| n.is(name))
            .map(|(_, v)| v)
    }

    /// The labels as a map (tests, diagnostics).
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels()
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_owned()))
            .collect()
    }

    /// `http` unless the service's scheme tag says otherwise.
    pub fn scheme(&self) -> &str {
        match &self.labels {
            Labels::Derived { scrape, .. } => scrape.scheme.unwrap_or(DEFAULT_SCHEME),
            Labels::Given(_) => self.label("__scheme__").unwrap_or(DEFAULT_SCHEME),
        }
    }

    pub fn metrics_path(&self) -> &str {
        match &self.labels {
            Labels::Derived { scrape, .. } => &scrape.path,
            Labels::Given(_) => self
                .label("__metrics_path__")
                .unwrap_or(DEFAULT_METRICS_PATH),
        }
    }

    fn identity(&self) -> (&str, &str, &str, MetricsSource, &str) {
        (
            &self.namespace,
            &self.service,
            &self.instance_id,
            self.source,
            &self.address,
        )
    }

    /// Whether both derive their labels from the very same data.
    fn same_source(&self, other: &Target) -> bool {
        match (&self.labels, &other.labels) {
            (
                Labels::Derived {
                    instance: a,
                    scrape: s,
                },
                Labels::Derived {
                    instance: b,
                    scrape: t,
                },
            ) => (Arc::ptr_eq(a, b) || a == b) && (Arc::ptr_eq(s, t) || s == t),
            (Labels::Given(a), Labels::Given(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Target {}

impl PartialOrd for Target {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Target {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.identity().cmp(&other.identity()).then_with(|| {
            if self.content == other.content && self.same_source(other) {
                return std::cmp::Ordering::Equal;
            }
            self.labels().cmp(&other.labels())
        })
    }
}

impl std::hash::Hash for Target {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.content.hash(state);
    }
}

/// Whether `name` is a valid label name as it is (`[a-zA-Z_][a-zA-Z0-9_]*`).
fn is_label_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `name` as a valid label name: borrowed when it already is one.
fn sanitized(name: &str) -> Cow<'_, str> {
    if is_label_name(name) {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(sanitize_label_name(name))
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
    /// An interval or timeout tag left out: the job's setting applies.
    BadTimingTag {
        namespace: String,
        service: String,
        tag: &'static str,
        value: String,
        /// What is wrong and what applies meanwhile.
        why: String,
        /// The discovery rule that supplied the value, if not a tag.
        rule: Option<usize>,
    },
    BadNetworkModeTag {
        namespace: String,
        service: String,
        value: String,
    },
    /// Bridge-mode targets skipped: no host port for their container port.
    NoHostPort {
        namespace: String,
        service: String,
        /// The setting naming the container port.
        tag: &'static str,
        container_port: u16,
        why: NoHostPort,
        /// How many instances (tasks) it skipped, and the first of them.
        instances: usize,
        first: String,
        /// The discovery rule that supplied the port, if not a tag.
        rule: Option<usize>,
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
                 \"http\" or \"https\"; its targets are scraped with the job's scheme until \
                 the tag is fixed"
            ),
            Problem::BadTimingTag {
                namespace,
                service,
                tag,
                value,
                why,
                rule,
            } => {
                write!(f, "service {service:?} in namespace {namespace:?}: ")?;
                match rule {
                    None => write!(f, "tag {tag}={value:?} {why}"),
                    Some(i) => write!(f, "{tag}={value:?} (from discovery rule {i}) {why}"),
                }
            }
            Problem::BadNetworkModeTag {
                namespace,
                service,
                value,
            } => write!(
                f,
                "service {service:?} in namespace {namespace:?}: tag {TAG_NETWORK_MODE}={value:?} \
                 is not \"awsvpc\", \"bridge\" or \"host\"; its targets use the registered \
                 address and ports, as for awsvpc, until the tag is fixed"
            ),
            Problem::NoHostPort {
                namespace,
                service,
                tag,
                container_port,
                why,
                instances,
                first,
                rule,
            } => {
                let tag = match rule {
                    None => tag.to_string(),
                    Some(i) => format!("{tag} from discovery rule {i}"),
                };
                let tasks = if *instances == 1 {
                    format!("task {first:?}")
                } else {
                    format!("{instances} tasks (first {first:?})")
                };
                write!(
                    f,
                    "service {service:?} in namespace {namespace:?} ({TAG_NETWORK_MODE}=bridge): \
                     {tasks}: container port {container_port} ({tag}) "
                )?;
                match why {
                    NoHostPort::NotBound => write!(
                        f,
                        "has no TCP host port binding; map it in the task definition's \
                         portMappings (hostPort 0 for a dynamic one) or fix {tag}"
                    ),
                    NoHostPort::Ambiguous(ports) => write!(
                        f,
                        "is bound by several containers, to host ports {ports:?}; give the \
                         metrics container a port of its own"
                    ),
                    NoHostPort::TaskNotFound { cluster } => write!(
                        f,
                        "cannot be mapped: ECS DescribeTasks does not know the task in cluster \
                         {cluster:?} (attribute {ATTR_CLUSTER}); asked again every minute"
                    ),
                    NoHostPort::NotATask => write!(
                        f,
                        "cannot be mapped: the instance id is no ECS task id (32 hex digits); \
                         bridge-mode targets come from instances ECS service discovery registers"
                    ),
                    NoHostPort::NoCluster => write!(
                        f,
                        "cannot be mapped: the instance has no {ATTR_CLUSTER} attribute to ask \
                         ECS DescribeTasks with"
                    ),
                    NoHostPort::Unknown(error) => write!(f, "cannot be mapped yet: {error}"),
                }?;
                write!(f, "; skipped, never guessed")
            }
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
/// The list is shared: the discovery cache, the publisher and the assignment hold
/// the same one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildOutput {
    pub targets: Arc<Vec<Target>>,
    pub problems: Vec<Problem>,
    pub skipped_without_ipv4: usize,
}

impl BuildOutput {
    /// Sorts and deduplicates targets and problems so output does not depend
    /// on the order in which services were read.
    pub fn finish(mut self) -> Self {
        let targets = Arc::make_mut(&mut self.targets);
        targets.sort_unstable();
        targets.dedup();
        self.problems.sort_unstable();
        self.problems.dedup();
        self
    }

    /// Appends `other`, whose targets all sort after these (the next service, in
    /// order): the result is as sorted as both were.
    pub fn extend(&mut self, other: &BuildOutput) {
        Arc::make_mut(&mut self.targets).extend(other.targets.iter().cloned());
        self.problems.extend(other.problems.iter().cloned());
        self.skipped_without_ipv4 += other.skipped_without_ipv4;
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

/// A Prometheus duration (`1h30m`, `15s`, `500ms`: units y w d h m s ms, each at
/// most once, largest first, at most about 292 years), as milliseconds; `None`
/// if it is not one.
pub fn parse_prometheus_duration(text: &str) -> Option<u64> {
    const UNITS: [(&str, u64); 7] = [
        ("y", 365 * 24 * 3_600_000),
        ("w", 7 * 24 * 3_600_000),
        ("d", 24 * 3_600_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut next_unit = 0;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        // `ms` before `m`: the longest unit name that matches.
        let (i, (name, millis)) = UNITS
            .iter()
            .enumerate()
            .skip(next_unit)
            .filter(|(_, (name, _))| rest.starts_with(name))
            .max_by_key(|(_, (name, _))| name.len())?;
        rest = &rest[name.len()..];
        next_unit = i + 1;
        total = total.checked_add(number.checked_mul(*millis)?)?;
    }
    // Prometheus holds durations as i64 nanoseconds and refuses longer ones.
    (total <= MAX_DURATION_MILLIS).then_some(total)
}

/// The longest duration Prometheus accepts, in whole milliseconds.
const MAX_DURATION_MILLIS: u64 = (i64::MAX / 1_000_000) as u64;

/// Port and scrape settings of one metrics source of a service, as its tags set them.
struct SourceConfig {
    source: MetricsSource,
    /// `None`: take the instance's `AWS_INSTANCE_PORT`, else 80 (application only).
    port: Option<u16>,
    scrape: Arc<Scrape>,
}

/// Reads the tags of a service into the sources it should be scraped on. A source whose
/// port tag is malformed is reported and left out; a malformed scheme, interval or
/// timeout is reported and only that setting left to the job.
fn source_configs(svc: &ServiceData<'_>, problems: &mut Vec<Problem>) -> Vec<SourceConfig> {
    let mut out = Vec::with_capacity(2);
    for source in [MetricsSource::App, MetricsSource::EcsExporter] {
        let tags = source.tags();
        let Some(path) = svc.tags.get(tags.path) else {
            continue;
        };
        let port = match (source, svc.tags.get(tags.port)) {
            (_, Some(value)) => match parse_port(value) {
                Some(port) => Some(port),
                None => {
                    problems.push(Problem::BadPortTag {
                        namespace: svc.namespace.to_owned(),
                        service: svc.service.to_owned(),
                        tag: tags.port,
                        value: value.clone(),
                    });
                    continue;
                }
            },
            (MetricsSource::App, None) => None,
            // The exporter target needs both of its tags.
            (MetricsSource::EcsExporter, None) => continue,
        };
        let scheme = match svc.tags.get(tags.scheme).map(|s| s.trim()) {
            None => None,
            Some("http") => Some("http"),
            Some("https") => Some("https"),
            Some(_) => {
                problems.push(Problem::BadSchemeTag {
                    namespace: svc.namespace.to_owned(),
                    service: svc.service.to_owned(),
                    tag: tags.scheme,
                    value: svc.tags[tags.scheme].clone(),
                });
                None
            }
        };
        let (interval, timeout) = scrape_timing(svc, &tags, problems);
        out.push(SourceConfig {
            source,
            port,
            scrape: Arc::new(Scrape {
                path: Arc::from(path.as_str()),
                scheme,
                interval,
                timeout,
            }),
        });
    }
    out
}

/// The interval and timeout a source's tags set, checked as a collector would
/// check them, so that no tag can make a collector refuse a target: each a
/// Prometheus duration, the interval at least [`MIN_SCRAPE_INTERVAL`], the
/// timeout above zero, only with an interval and no longer than it. An interval
/// whose timeout is not tagged (or not valid) brings a timeout of the smaller of
/// it and [`DEFAULT_TIMEOUT_CAP`].
fn scrape_timing(
    svc: &ServiceData<'_>,
    tags: &SourceTags,
    problems: &mut Vec<Problem>,
) -> (Option<Arc<str>>, Option<Arc<str>>) {
    let mut report = |tag: &'static str, value: &str, why: String| {
        problems.push(Problem::BadTimingTag {
            namespace: svc.namespace.to_owned(),
            service: svc.service.to_owned(),
            tag,
            value: value.to_owned(),
            why,
            rule: svc.origin(tag),
        })
    };
    let interval_tag = tags.interval;
    let interval_name = svc.named(interval_tag);
    let raw_interval = svc.tags.get(interval_tag).map(|v| v.trim());
    let interval = raw_interval.and_then(|value| match parse_prometheus_duration(value) {
        Some(ms) if u128::from(ms) >= MIN_SCRAPE_INTERVAL.as_millis() => Some((value, ms)),
        parsed => {
            let what = if parsed.is_some() {
                "is shorter than 1s"
            } else {
                "is not a duration (such as 15s, 1m or 1m30s)"
            };
            report(
                interval_tag,
                value,
                format!("{what}; the job's interval and timeout apply until it is fixed"),
            );
            None
        }
    });
    let timeout = svc.tags.get(tags.timeout).map(|v| v.trim());
    let timeout = match (timeout, interval, raw_interval) {
        (None, _, _) => None,
        (Some(value), None, None) => {
            report(
                tags.timeout,
                value,
                format!(
                    "needs {interval_tag} to be checked against (a collector refuses a \
                     timeout longer than the interval); set {interval_tag} too, the job's \
                     timeout applies meanwhile"
                ),
            );
            None
        }
        // The interval was reported already; the timeout waits for it.
        (Some(_), None, Some(_)) => None,
        (Some(value), Some((interval, interval_ms)), _) => {
            let fallback = default_timeout(interval, interval_ms);
            match parse_prometheus_duration(value) {
                Some(ms) if ms > 0 && ms <= interval_ms => Some(value),
                parsed => {
                    let what = match parsed {
                        Some(0) => "is zero".to_owned(),
                        Some(_) => format!("is longer than {interval_name}={interval}"),
                        None => "is not a duration (such as 10s or 500ms)".to_owned(),
                    };
                    report(
                        tags.timeout,
                        value,
                        format!("{what}; the timeout is {fallback} until it is fixed"),
                    );
                    None
                }
            }
        }
    };
    let Some((interval, interval_ms)) = interval else {
        return (None, None);
    };
    let timeout = timeout.map_or_else(|| default_timeout(interval, interval_ms), Arc::from);
    (Some(Arc::from(interval)), Some(timeout))
}

/// The timeout an interval brings when none is tagged: the interval itself
/// when it is at most [`DEFAULT_TIMEOUT_CAP`], else that cap.
fn default_timeout(interval: &str, interval_ms: u64) -> Arc<str> {
    if u128::from(interval_ms) <= DEFAULT_TIMEOUT_CAP.as_millis() {
        Arc::from(interval)
    } else {
        Arc::from(format!("{}s", DEFAULT_TIMEOUT_CAP.as_secs()))
    }
}

/// Builds the targets of one service and appends them to `out`. The targets point
/// at the service's instances: nothing of an instance is copied.
pub fn build_service(svc: &ServiceData<'_>, out: &mut BuildOutput) {
    let sources = source_configs(svc, &mut out.problems);
    let namespace: Arc<str> = Arc::from(svc.namespace);
    let service: Arc<str> = Arc::from(svc.service);
    let mode = NetworkMode::of(svc.tags).unwrap_or_else(|value| {
        out.problems.push(Problem::BadNetworkModeTag {
            namespace: svc.namespace.to_owned(),
            service: svc.service.to_owned(),
            value: value.to_owned(),
        });
        NetworkMode::Awsvpc
    });
    // Container ports to map to host ports: those a setting names in bridge
    // mode (a port from `AWS_INSTANCE_PORT` is the host port ECS registered).
    let host_ports = svc.host_ports.filter(|_| mode == NetworkMode::Bridge);
    // Skipped targets, by (source, why): how many, and the first instance.
    let mut unmapped: BTreeMap<(MetricsSource, NoHostPort), (usize, &str)> = BTreeMap::new();
    for inst in svc.instances {
        let Some(raw_ip) = inst.attributes.get(ATTR_IPV4) else {
            out.skipped_without_ipv4 += 1;
            continue;
        };
        let Ok(ip) = raw_ip.trim().parse::<Ipv4Addr>() else {
            out.problems.push(Problem::BadIpv4Attribute {
                namespace: svc.namespace.to_owned(),
                service: svc.service.to_owned(),
                instance: inst.id.to_string(),
                value: raw_ip.to_owned(),
            });
            continue;
        };
        for cfg in &sources {
            let port = match (cfg.port, host_ports) {
                (Some(port), None) => port,
                (Some(port), Some(HostPorts(lookup))) => match lookup(inst, port) {
                    Ok(host_port) => host_port,
                    Err(why) => {
                        let (count, _) = unmapped.entry((cfg.source, why)).or_insert((0, &inst.id));
                        *count += 1;
                        continue;
                    }
                },
                (None, _) => match inst.attributes.get(ATTR_PORT) {
                    None => DEFAULT_APP_PORT,
                    Some(value) => match parse_port(value) {
                        Some(port) => port,
                        None => {
                            out.problems.push(Problem::BadPortAttribute {
                                namespace: svc.namespace.to_owned(),
                                service: svc.service.to_owned(),
                                instance: inst.id.to_string(),
                                value: value.to_owned(),
                            });
                            continue;
                        }
                    },
                },
            };
            let target = Target {
                namespace: namespace.clone(),
                service: service.clone(),
                instance_id: inst.id.clone(),
                source: cfg.source,
                address: Arc::from(format!("{ip}:{port}")),
                labels: Labels::Derived {
                    instance: inst.clone(),
                    scrape: cfg.scrape.clone(),
                },
                content: 0,
            };
            Arc::make_mut(&mut out.targets).push(target.with_content());
        }
    }
    for ((source, why), (instances, first)) in unmapped {
        let tags = source.tags();
        out.problems.push(Problem::NoHostPort {
            namespace: svc.namespace.to_owned(),
            service: svc.service.to_owned(),
            tag: tags.port,
            container_port: sources
                .iter()
                .find(|c| c.source == source)
                .and_then(|c| c.port)
                .unwrap_or_default(),
            why,
            instances,
            first: first.to_owned(),
            rule: svc.origin(tags.port),
        });
    }
}

/// The container ports a service's settings name (application, exporter),
/// which bridge-mode tasks bind to host ports: what ECS must be asked about.
/// `None` when the service's tasks need no mapping (not bridge mode).
pub fn mapped_ports(tags: &BTreeMap<String, String>) -> Option<Vec<u16>> {
    if NetworkMode::of(tags) != Ok(NetworkMode::Bridge) {
        return None;
    }
    // The sources the tags configure, as building reads them; problems are
    // reported when building.
    let svc = ServiceData::tagged("", "", tags, &[]);
    let ports = source_configs(&svc, &mut Vec::new())
        .iter()
        .filter_map(|cfg| cfg.port)
        .collect();
    Some(ports)
}

/// Builds and normalises the targets of many services.
pub fn build_all<'a>(services: impl IntoIterator<Item = ServiceData<'a>>) -> BuildOutput {
    let mut out = BuildOutput::default();
    for svc in services {
        build_service(&svc, &mut out);
    }
    out.finish()
}

/// Writes `s` as a JSON string body (no quotes), escaped as `serde_json` does.
fn write_escaped(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// One target group, `{"targets":["addr"],"labels":{...}}`, labels in name order,
/// the `__meta_cloudmap_*` ones as `meta` says.
fn write_group(out: &mut Vec<u8>, t: &Target, meta: MetaLabels) {
    out.extend_from_slice(b"{\"targets\":[\"");
    write_escaped(out, &t.address);
    out.extend_from_slice(b"\"],\"labels\":{");
    let mut first = true;
    t.for_each_label(|name, value| {
        if !meta.keeps(name) {
            return;
        }
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.push(b'"');
        write_escaped(out, name.prefix);
        write_escaped(out, &name.rest);
        out.extend_from_slice(b"\":\"");
        write_escaped(out, value);
        out.push(b'"');
    });
    out.extend_from_slice(b"}}");
}

/// Renders targets as an `http_sd` / `file_sd` JSON document: one group per target.
pub fn render<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, t) in targets.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_group(&mut out, t, MetaLabels::All);
    }
    out.push(b']');
    out
}

/// An http_sd document as it is kept, mirrored and sent between replicas:
/// gzip-compressed once (the JSON shrinks about seventeenfold), with the ETag of
/// its JSON. The JSON itself is inflated for clients that do not accept gzip,
/// Prometheus's http_sd among them, once per change (see `state::Published`).
#[derive(Clone, Debug)]
pub struct Body {
    gzip: bytes::Bytes,
    etag: String,
    targets: usize,
    /// Length of the JSON, once known (rendered here or checked on receipt).
    json_len: Option<u64>,
}

/// The same document: its bytes, ETag and count (the JSON's length follows).
impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        self.gzip == other.gzip && self.etag == other.etag && self.targets == other.targets
    }
}

impl Eq for Body {}

/// Why bytes received as a gzip-compressed http_sd document were refused.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("not gzip-compressed: {0}")]
    Gzip(#[from] std::io::Error),
    #[error("not an http_sd document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the document is not the one its ETag and count name")]
    Mismatch,
    #[error(
        "it inflates to more than {MAX_INFLATE_RATIO} times its size, far beyond any http_sd \
         document"
    )]
    TooLarge,
}

/// Feeds JSON in chunks to the gzip encoder and the ETag's hash, so a large
/// document is never held uncompressed.
struct BodyWriter {
    chunk: Vec<u8>,
    hash: xxhash_rust::xxh3::Xxh3,
    len: u64,
    encoder: flate2::write::GzEncoder<Vec<u8>>,
}

impl BodyWriter {
    const CHUNK: usize = 64 * 1024;

    fn new() -> Self {
        BodyWriter {
            chunk: Vec::with_capacity(Self::CHUNK + 4096),
            hash: xxhash_rust::xxh3::Xxh3::new(),
            len: 0,
            encoder: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
        }
    }

    fn flush_if_full(&mut self, force: bool) {
        use std::io::Write as _;
        if force || self.chunk.len() >= Self::CHUNK {
            self.hash.update(&self.chunk);
            self.len += self.chunk.len() as u64;
            // Writing to a Vec cannot fail.
            let _ = self.encoder.write_all(&self.chunk);
            self.chunk.clear();
        }
    }

    fn finish(mut self, targets: usize) -> Body {
        self.flush_if_full(true);
        let gzip = self.encoder.finish().unwrap_or_default();
        Body {
            gzip: bytes::Bytes::from(gzip),
            etag: etag_of(self.hash.digest()),
            targets,
            json_len: Some(self.len),
        }
    }
}

impl Body {
    /// Renders and compresses `targets` (see [`render`]).
    pub fn render<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Body {
        Body::render_with(targets, MetaLabels::All)
    }

    /// [`Body::render`] with only the `__meta_cloudmap_*` labels `meta` keeps.
    pub fn render_with<'a>(
        targets: impl IntoIterator<Item = &'a Target>,
        meta: MetaLabels,
    ) -> Body {
        let mut w = BodyWriter::new();
        w.chunk.push(b'[');
        let mut count = 0;
        for t in targets {
            if count > 0 {
                w.chunk.push(b',');
            }
            write_group(&mut w.chunk, t, meta);
            count += 1;
            w.flush_if_full(false);
        }
        w.chunk.push(b']');
        w.finish(count)
    }

    /// The same document with only the `__meta_cloudmap_*` labels `meta` keeps:
    /// read back and rendered again (a body received whole, from a leader of an
    /// earlier release). Kept as it is when it cannot be read.
    pub fn with_meta_labels(self, meta: MetaLabels) -> Body {
        if meta == MetaLabels::All {
            return self;
        }
        let groups = self
            .json()
            .ok()
            .and_then(|json| serde_json::from_slice::<Vec<Group>>(&json).ok());
        match groups {
            Some(groups) => Body::render_with(from_groups(groups).iter(), meta),
            None => self,
        }
    }

    /// A document given as JSON with `targets` groups.
    pub fn from_json(json: &[u8], targets: usize) -> Body {
        let mut w = BodyWriter::new();
        w.chunk.extend_from_slice(json);
        w.finish(targets)
    }

    /// `[]`
    pub fn empty() -> Body {
        Body::from_json(b"[]", 0)
    }

    /// Bytes received gzip-compressed (from the leader): inflated as they are
    /// read, within [`inflate_limit`], to check that they are an http_sd
    /// document, to count its groups and to compute its ETag; the JSON is never
    /// held whole.
    pub fn from_gzip(gzip: bytes::Bytes) -> Result<Body, BodyError> {
        let read: Document<Vec<serde::de::IgnoredAny>> = read_document(&gzip)?;
        Ok(Body {
            etag: read.etag,
            targets: read.value.len(),
            json_len: Some(read.json_len),
            gzip,
        })
    }

    /// A document received as JSON (from a leader that does not compress): checked,
    /// counted and compressed here.
    pub fn from_json_checked(json: &[u8]) -> Result<Body, BodyError> {
        let groups: Vec<serde::de::IgnoredAny> = serde_json::from_slice(json)?;
        Ok(Body::from_json(json, groups.len()))
    }

    /// Bytes taken on trust as compressed by a shard-sd leader (a mirrored
    /// copy), checked by [`Body::checked`] before they are served.
    pub fn unchecked(gzip: bytes::Bytes, etag: String, targets: usize) -> Body {
        Body {
            gzip,
            etag,
            targets,
            json_len: None,
        }
    }

    /// The same body once its bytes proved to be the http_sd document its ETag
    /// and count say.
    pub fn checked(&self) -> Result<Body, BodyError> {
        let body = Body::from_gzip(self.gzip.clone())?;
        if body.etag != self.etag || body.targets != self.targets {
            return Err(BodyError::Mismatch);
        }
        Ok(body)
    }

    pub fn gzip(&self) -> &bytes::Bytes {
        &self.gzip
    }

    /// The strong ETag of the JSON.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// The ETag of the gzip encoding (a different representation, a different tag).
    pub fn gzip_etag(&self) -> String {
        format!("{}-gzip\"", self.etag.trim_end_matches('"'))
    }

    pub fn targets(&self) -> usize {
        self.targets
    }

    /// Length of the JSON, when known: always for a body rendered here or
    /// checked on receipt.
    pub fn json_len(&self) -> Option<u64> {
        self.json_len
    }

    /// The JSON as a stream of chunks of at most `chunk` bytes, inflated as it
    /// is read: a large list sent to a client without gzip costs CPU, never a
    /// copy held for it. A body is only ever our own output or checked
    /// bytes, so no limit applies; a failure (none is expected) ends the stream
    /// with an error, never with a short document.
    pub fn json_chunks(&self, chunk: usize) -> impl Iterator<Item = std::io::Result<bytes::Bytes>> {
        let mut decoder =
            flate2::read::MultiGzDecoder::new(std::io::Cursor::new(self.gzip.clone()));
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let mut buf = vec![0u8; chunk];
            let mut filled = 0;
            while filled < chunk {
                match std::io::Read::read(&mut decoder, &mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(err) => {
                        failed = true;
                        return Some(Err(err));
                    }
                }
            }
            (filled > 0).then(|| {
                buf.truncate(filled);
                Ok(bytes::Bytes::from(buf))
            })
        })
    }

    /// The JSON, inflated (our own output or checked bytes: no limit applies).
    pub fn json(&self) -> Result<Vec<u8>, BodyError> {
        use std::io::Read as _;
        let mut out = Vec::with_capacity(self.json_len.unwrap_or(0).min(1 << 30) as usize);
        flate2::read::MultiGzDecoder::new(&self.gzip[..]).read_to_end(&mut out)?;
        Ok(out)
    }
}

/// A document read from gzip-compressed http_sd JSON, with its ETag and length.
pub struct Document<T> {
    pub value: T,
    pub etag: String,
    pub json_len: u64,
}

/// Reads gzip-compressed JSON as `T` while it is inflated, within
/// [`inflate_limit`], hashing it for its ETag on the way: a large shard is never
/// held as JSON.
pub fn read_document<T: serde::de::DeserializeOwned>(
    gzip: &[u8],
) -> Result<Document<T>, BodyError> {
    let mut reader = HashingReader {
        inner: flate2::read::MultiGzDecoder::new(gzip),
        hash: xxhash_rust::xxh3::Xxh3::new(),
        len: 0,
        limit: inflate_limit(gzip.len()),
    };
    let parsed = serde_json::from_reader(std::io::BufReader::with_capacity(64 * 1024, &mut reader));
    match parsed {
        Ok(value) => Ok(Document {
            value,
            etag: etag_of(reader.hash.digest()),
            json_len: reader.len,
        }),
        Err(_) if reader.len >= reader.limit => Err(BodyError::TooLarge),
        Err(err) if err.is_io() => Err(BodyError::Gzip(err.into())),
        Err(err) => Err(BodyError::Json(err)),
    }
}

/// Counts and hashes what passes through, and fails past its limit.
struct HashingReader<R> {
    inner: R,
    hash: xxhash_rust::xxh3::Xxh3,
    len: u64,
    limit: u64,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.len += n as u64;
        if self.len >= self.limit {
            return Err(std::io::Error::other("inflates past its limit"));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The most JSON that `compressed` bytes may inflate to: http_sd JSON compresses
/// about twenty-fold, a decompression bomb a thousand-fold.
pub fn inflate_limit(compressed: usize) -> u64 {
    (compressed as u64)
        .saturating_mul(MAX_INFLATE_RATIO)
        .max(1 << 20)
}

/// See [`inflate_limit`].
pub const MAX_INFLATE_RATIO: u64 = 100;

/// Inflates a gzip stream (one member or several, concatenated), within
/// [`inflate_limit`].
pub fn inflate(gzip: &[u8]) -> Result<Vec<u8>, BodyError> {
    use std::io::Read as _;
    let limit = inflate_limit(gzip.len());
    let mut out = Vec::with_capacity(gzip.len().saturating_mul(8).min(64 << 20));
    flate2::read::MultiGzDecoder::new(gzip)
        .take(limit)
        .read_to_end(&mut out)?;
    if out.len() as u64 >= limit {
        return Err(BodyError::TooLarge);
    }
    Ok(out)
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
/// `namespace` / `service` labels), the source from `metrics_source`. Repeated
/// strings are shared.
pub fn from_groups(groups: Vec<Group>) -> Vec<Target> {
    from_groups_sharing(groups, &mut Interner::default())
}

/// [`from_groups`], sharing strings through `strings` (with other documents read).
pub fn from_groups_sharing(groups: Vec<Group>, strings: &mut Interner) -> Vec<Target> {
    let label = |labels: &BTreeMap<String, String>, meta: &str, plain: &str| {
        labels
            .get(&format!("{META_PREFIX}{meta}"))
            .or_else(|| labels.get(plain))
            .map_or("", String::as_str)
            .to_owned()
    };
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let namespace = strings.get(&label(&g.labels, "namespace_name", "namespace"));
        let service = strings.get(&label(&g.labels, "service_name", "service"));
        let instance_id = strings.get(&label(&g.labels, "instance_id", "taskid"));
        let source = match g.labels.get(LABEL_METRICS_SOURCE).map(String::as_str) {
            Some("ecs-exporter") => MetricsSource::EcsExporter,
            _ => MetricsSource::App,
        };
        let labels: Arc<[(Arc<str>, Arc<str>)]> = g
            .labels
            .iter()
            .map(|(k, v)| (strings.get(k), strings.get(v)))
            .collect();
        for address in g.targets {
            out.push(Target::given(
                namespace.clone(),
                service.clone(),
                instance_id.clone(),
                source,
                strings.get(&address),
                labels.clone(),
            ));
        }
    }
    out
}

/// A strong ETag for a rendered body.
pub fn etag(body: &[u8]) -> String {
    etag_of(xxhash_rust::xxh3::xxh3_64(body))
}

/// The ETag of JSON whose XXH3-64 is `digest` (hashed whole or as it streamed).
fn etag_of(digest: u64) -> String {
    format!("\"{digest:016x}\"")
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
            ])
            .into_iter()
            .collect(),
        }
    }

    fn shared(instances: impl IntoIterator<Item = Instance>) -> Vec<Arc<Instance>> {
        instances.into_iter().map(Arc::new).collect()
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
        let instances = shared([post_instance()]);
        let out = build_all([ServiceData {
            namespace: "ecs-services",
            service: "webapp-svc",
            tags: &tags,
            instances: &instances,
            rule: None,
            host_ports: None,
        }]);
        assert!(out.problems.is_empty());
        let mut rendered: serde_json::Value =
            serde_json::from_slice(&render(out.targets.iter())).unwrap();
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
        inst.attributes.insert("AVAILABILITY_ZONE", "us-east-1a");
        inst.attributes.insert("my-attr.x", "v");
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([inst]),
            rule: None,
            host_ports: None,
        }]);
        let labels = &out.targets[0].label_map();
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
        with_port.attributes.insert(ATTR_PORT, "8080");
        let mut without = post_instance();
        without.id = "other".into();
        without.attributes.insert(ATTR_IPV4, "10.0.0.2");
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([with_port, without]),
            rule: None,
            host_ports: None,
        }]);
        let addrs: Vec<_> = out.targets.iter().map(|t| &*t.address).collect();
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
            instances: &shared([post_instance()]),
            rule: None,
            host_ports: None,
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
            instances: &shared([post_instance()]),
            rule: None,
            host_ports: None,
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
                instances: &shared([post_instance()]),
                rule: None,
                host_ports: None,
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
            instances: &shared([post_instance()]),
            rule: None,
            host_ports: None,
        }]);
        // A bad scheme leaves only the scheme to the job: the target stays.
        assert_eq!(out.targets.len(), 2);
        assert_eq!(out.targets[0].label("__scheme__"), Some("https"));
        assert_eq!(out.targets[0].scheme(), "https");
        assert_eq!(out.targets[1].label("__scheme__"), None);
        assert!(matches!(
            out.problems[0],
            Problem::BadSchemeTag {
                tag: "ECS_METRICS_SCHEME",
                ..
            }
        ));
        let msg = out.problems[0].to_string();
        assert!(msg.contains("\"svc\"") && msg.contains("gopher"), "{msg}");
    }

    #[test]
    fn prometheus_durations_parse_as_prometheus_parses_them() {
        for (text, millis) in [
            ("15s", 15_000),
            ("1m30s", 90_000),
            ("500ms", 500),
            ("1h", 3_600_000),
            ("2d", 172_800_000),
            ("1w", 604_800_000),
            ("1y", 31_536_000_000),
            ("1m500ms", 60_500),
            ("0s", 0),
            ("292y", 292 * 31_536_000_000),
            ("9223372036854ms", 9_223_372_036_854),
        ] {
            assert_eq!(parse_prometheus_duration(text), Some(millis), "{text}");
        }
        for bad in [
            "",
            "s",
            "10",
            "1.5s",
            "1s1m",
            "1s1s",
            "-1s",
            " 1s",
            "1 s",
            "1sec",
            "1M",
            "ms",
            "99999999999999999999y",
            "293y",
            "106752d",
            "9223372036855ms",
        ] {
            assert_eq!(parse_prometheus_duration(bad), None, "{bad:?}");
        }
    }

    /// Interval and timeout labels of the app and exporter targets built with `extra` tags.
    fn timing(extra: &[(&str, &str)]) -> (Vec<[Option<String>; 2]>, Vec<String>) {
        let mut tags = post_tags();
        tags.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([post_instance()]),
            rule: None,
            host_ports: None,
        }]);
        let labels = out
            .targets
            .iter()
            .map(|t| {
                ["__scrape_interval__", "__scrape_timeout__"].map(|n| t.label(n).map(str::to_owned))
            })
            .collect();
        (labels, out.problems.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn interval_and_timeout_tags_set_scrape_labels_of_their_source() {
        let some = |s: &str| Some(s.to_owned());
        let (labels, problems) = timing(&[("METRICS_INTERVAL", "2s"), ("METRICS_TIMEOUT", "1s")]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(labels, [[some("2s"), some("1s")], [None, None]]);
        let (labels, _) = timing(&[
            ("ECS_METRICS_INTERVAL", "1m"),
            ("ECS_METRICS_TIMEOUT", "30s"),
        ]);
        assert_eq!(labels, [[None, None], [some("1m"), some("30s")]]);
        // An interval alone: a timeout no collector refuses (≤ interval, ≤ 10 s).
        let (labels, problems) =
            timing(&[("METRICS_INTERVAL", "2s"), ("ECS_METRICS_INTERVAL", "5m")]);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            labels,
            [[some("2s"), some("2s")], [some("5m"), some("10s")]]
        );
        // Trimmed, as every tag is.
        let (labels, _) = timing(&[("METRICS_INTERVAL", " 3s ")]);
        assert_eq!(labels[0], [some("3s"), some("3s")]);
    }

    #[test]
    fn a_bad_timing_tag_leaves_that_setting_to_the_job_and_keeps_the_target() {
        let some = |s: &str| Some(s.to_owned());
        for (tags, expected, tag) in [
            (
                vec![("METRICS_INTERVAL", "fast")],
                [None, None],
                "METRICS_INTERVAL",
            ),
            (
                vec![("METRICS_INTERVAL", "0s")],
                [None, None],
                "METRICS_INTERVAL",
            ),
            (
                vec![("METRICS_INTERVAL", "fast"), ("METRICS_TIMEOUT", "1s")],
                [None, None],
                "METRICS_INTERVAL",
            ),
            (
                vec![("METRICS_INTERVAL", "500ms")],
                [None, None],
                "METRICS_INTERVAL",
            ),
            (
                vec![("METRICS_INTERVAL", "293y")],
                [None, None],
                "METRICS_INTERVAL",
            ),
            (
                vec![("METRICS_INTERVAL", "1m"), ("METRICS_TIMEOUT", "0s")],
                [some("1m"), some("10s")],
                "METRICS_TIMEOUT",
            ),
            (
                vec![("METRICS_TIMEOUT", "5s")],
                [None, None],
                "METRICS_TIMEOUT",
            ),
            (
                vec![("METRICS_INTERVAL", "2s"), ("METRICS_TIMEOUT", "3s")],
                [some("2s"), some("2s")],
                "METRICS_TIMEOUT",
            ),
            (
                vec![("METRICS_INTERVAL", "2s"), ("METRICS_TIMEOUT", "1.5s")],
                [some("2s"), some("2s")],
                "METRICS_TIMEOUT",
            ),
        ] {
            let (labels, problems) = timing(&tags);
            assert_eq!(problems.len(), 1, "{tags:?}: {problems:?}");
            assert_eq!(labels.len(), 2, "{tags:?}: both targets kept");
            assert_eq!(labels[0], expected, "{tags:?}");
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains("\"svc\"") && p.contains(&format!("tag {tag}="))),
                "{tags:?}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_timing_problem_says_what_applies_meanwhile() {
        let (_, problems) = timing(&[("METRICS_INTERVAL", "2s"), ("METRICS_TIMEOUT", "3s")]);
        assert_eq!(
            problems,
            [
                "service \"svc\" in namespace \"ns\": tag METRICS_TIMEOUT=\"3s\" is longer than \
              METRICS_INTERVAL=2s; the timeout is 2s until it is fixed"
            ]
        );
        let (_, problems) = timing(&[("ECS_METRICS_TIMEOUT", "3s")]);
        assert!(
            problems[0].contains("needs ECS_METRICS_INTERVAL")
                && problems[0].contains("the job's timeout applies"),
            "{problems:?}"
        );
        let (_, problems) = timing(&[("METRICS_INTERVAL", "1ms")]);
        assert!(problems[0].contains("shorter than 1s"), "{problems:?}");
    }

    #[test]
    fn meta_labels_setting_keeps_only_the_meta_labels_asked_for() {
        let tags = post_tags();
        let mut inst = post_instance();
        inst.attributes.insert("AVAILABILITY_ZONE", "us-east-1a");
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([inst]),
            rule: None,
            host_ports: None,
        }]);
        let names = |meta| {
            let body = Body::render_with(out.targets.iter(), meta);
            let groups: Vec<Group> = serde_json::from_slice(&body.json().unwrap()).unwrap();
            let names: Vec<String> = groups[0].labels.keys().cloned().collect();
            (names, body.json_len().unwrap())
        };
        let (all, all_len) = names(MetaLabels::All);
        let (basic, basic_len) = names(MetaLabels::Basic);
        let (none, none_len) = names(MetaLabels::None);
        assert_eq!(
            Body::render(out.targets.iter()),
            Body::render_with(out.targets.iter(), MetaLabels::All)
        );
        assert!(all
            .iter()
            .any(|n| n == "__meta_cloudmap_attribute_AVAILABILITY_ZONE"));
        let plain = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|n| !n.starts_with(META_PREFIX))
                .cloned()
                .collect()
        };
        assert_eq!(plain(&all), plain(&basic));
        assert_eq!(plain(&all), none);
        assert_eq!(
            basic
                .iter()
                .filter(|n| n.starts_with(META_PREFIX))
                .collect::<Vec<_>>(),
            [
                "__meta_cloudmap_instance_id",
                "__meta_cloudmap_namespace_name",
                "__meta_cloudmap_service_name"
            ]
        );
        assert!(all_len > basic_len && basic_len > none_len);
        // Labels read back from a body (a copy, `plan`) are filtered by name alike.
        let back = from_groups(serde_json::from_slice(&render(out.targets.iter())).unwrap());
        assert_eq!(
            Body::render_with(back.iter(), MetaLabels::Basic),
            Body::render_with(out.targets.iter(), MetaLabels::Basic)
        );
        // A whole body received from a leader of an earlier release, alike.
        for meta in [MetaLabels::All, MetaLabels::Basic, MetaLabels::None] {
            assert_eq!(
                Body::render(out.targets.iter()).with_meta_labels(meta),
                Body::render_with(out.targets.iter(), meta)
            );
        }
    }

    #[test]
    fn meta_labels_names_parse_case_insensitively() {
        assert_eq!(MetaLabels::from_name("BASIC"), Some(MetaLabels::Basic));
        assert_eq!(MetaLabels::from_name("none"), Some(MetaLabels::None));
        assert_eq!(MetaLabels::from_name("some"), None);
        for name in MetaLabels::NAMES {
            assert_eq!(MetaLabels::from_name(name).unwrap().as_str(), *name);
        }
    }

    #[test]
    fn instances_without_ipv4_are_counted_and_bad_ipv4_reported() {
        let tags = post_tags();
        let mut no_ip = post_instance();
        no_ip.attributes.remove(ATTR_IPV4);
        let mut bad_ip = post_instance();
        bad_ip.attributes.insert(ATTR_IPV4, "10.0.0.300");
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([no_ip, bad_ip]),
            rule: None,
            host_ports: None,
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
            attributes: tags_of_ip("10.0.0.1").into_iter().collect(),
        };
        let out = build_all([ServiceData {
            namespace: "ns",
            service: "svc",
            tags: &tags,
            instances: &shared([inst]),
            rule: None,
            host_ports: None,
        }]);
        for t in out.targets.iter() {
            for absent in ["cluster", "service", "taskdefinition", "__scheme__"] {
                assert!(t.label(absent).is_none(), "{absent}");
            }
        }
    }

    fn tags_of_ip(ip: &str) -> BTreeMap<String, String> {
        tags(&[(ATTR_IPV4, ip)])
    }

    /// The post's service and instance, built.
    fn post_targets() -> BuildOutput {
        build_all([ServiceData {
            namespace: "ecs-services",
            service: "webapp-svc",
            tags: &post_tags(),
            instances: &shared([post_instance()]),
            rule: None,
            host_ports: None,
        }])
    }

    #[test]
    fn rendered_targets_read_back_the_same() {
        let out = post_targets();
        let groups: Vec<Group> = serde_json::from_slice(&render(out.targets.iter())).unwrap();
        let mut back = from_groups(groups);
        back.sort();
        assert_eq!(back, *out.targets);
    }

    #[test]
    fn a_body_is_its_json_compressed_with_the_json_etag() {
        let out = post_targets();
        let json = render(out.targets.iter());
        let body = Body::render(out.targets.iter());
        assert_eq!(body.json().unwrap(), json);
        let chunks: Vec<bytes::Bytes> = body.json_chunks(100).map(Result::unwrap).collect();
        assert!(chunks.iter().all(|c| c.len() <= 100) && chunks.len() > 1);
        assert_eq!(chunks.concat(), json);
        assert_eq!(body.etag(), etag(&json));
        assert_eq!(body.targets(), 2);
        assert_ne!(body.gzip_etag(), body.etag());
        // What a follower receives is checked, and refused when it is not that.
        let received = Body::from_gzip(body.gzip().clone()).expect("valid");
        assert_eq!(received, body);
        assert_eq!(received.json_len(), Some(json.len() as u64));
        assert_eq!(body.json_len(), Some(json.len() as u64));
        assert!(matches!(
            Body::from_gzip(bytes::Bytes::from_static(b"[]")),
            Err(BodyError::Gzip(_))
        ));
        // Trailing bytes after the document are not a document.
        let trailing = Body::from_json(b"[] x", 0);
        assert!(matches!(
            Body::from_gzip(trailing.gzip().clone()),
            Err(BodyError::Json(_))
        ));
        // A bomb: a few kilobytes that would inflate to gigabytes.
        let bomb = {
            use std::io::Write as _;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(b"[").unwrap();
            let zeros = vec![b' '; 1 << 20];
            for _ in 0..200 {
                enc.write_all(&zeros).unwrap();
            }
            enc.write_all(b"]").unwrap();
            bytes::Bytes::from(enc.finish().unwrap())
        };
        assert!(bomb.len() < 1 << 20);
        assert!(matches!(
            Body::from_gzip(bomb.clone()),
            Err(BodyError::TooLarge)
        ));
        assert!(matches!(inflate(&bomb), Err(BodyError::TooLarge)));
        let not_groups = Body::from_json(b"{\"a\":1}", 1);
        assert!(Body::from_gzip(not_groups.gzip().clone()).is_err());
        let lying = Body::unchecked(body.gzip().clone(), etag(b"[]"), 2);
        assert!(matches!(lying.checked(), Err(BodyError::Mismatch)));
        assert_eq!(Body::empty().json().unwrap(), b"[]");
    }

    #[test]
    fn the_interner_shares_strings_and_forgets_unused_ones() {
        let mut strings = Interner::default();
        let a = strings.instance(
            "i-1",
            [("ECS_CLUSTER_NAME", "c"), ("AWS_INSTANCE_IPV4", "10.0.0.1")],
        );
        let b = strings.instance(
            "i-2",
            [("ECS_CLUSTER_NAME", "c"), ("AWS_INSTANCE_IPV4", "10.0.0.2")],
        );
        let cluster = |i: &Instance| {
            i.attributes
                .iter()
                .find(|(k, _)| *k == "ECS_CLUSTER_NAME")
                .map(|(_, v)| v.as_ptr())
        };
        assert_eq!(cluster(&a), cluster(&b), "one copy of a repeated value");
        assert_eq!(a.attributes.get("AWS_INSTANCE_IPV4"), Some("10.0.0.1"));
        drop(b);
        for i in 0..3000 {
            strings.get(&format!("gone-{i}"));
        }
        strings.prune();
        // Only what `a` still holds survives (its id, 2 names, 2 values).
        assert_eq!(strings.len(), 5);
    }

    #[test]
    fn attributes_behave_as_a_map() {
        let mut attrs: Attributes = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
        assert_eq!(attrs.iter().collect::<Vec<_>>(), [("a", "1"), ("b", "3")]);
        attrs.insert("a", "9");
        attrs.remove("b");
        assert_eq!(attrs.iter().collect::<Vec<_>>(), [("a", "9")]);
        assert_eq!(attrs.get("b"), None);
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
                Instance {
                    id: id.into(),
                    attributes: attributes.into_iter().collect(),
                }
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
                Just(TAG_METRICS_INTERVAL.to_string()),
                Just(TAG_METRICS_TIMEOUT.to_string()),
                Just(TAG_ECS_METRICS_INTERVAL.to_string()),
                Just(TAG_ECS_METRICS_TIMEOUT.to_string()),
                "[A-Z]{1,5}",
            ],
            prop_oneof![
                Just("/metrics".to_string()),
                "[0-9]{1,6}",
                Just("https".to_string()),
                "[0-9]{1,3}(ms|s|m|h)",
                ".{0,6}"
            ],
            0..8,
        )
    }

    proptest! {
        #[test]
        fn label_names_order_as_their_text_does(
            a in (0usize..5, "[A-Z_a-z]{0,6}"),
            b in (0usize..5, "[A-Z_a-z]{0,6}"),
        ) {
            const PREFIXES: [&str; 5] =
                ["", "__meta_cloudmap_attribute_", "__meta", "cluster", "__meta_cloudmap_attribute_A"];
            let name = |(p, rest): &(usize, String)| LabelName {
                prefix: PREFIXES[*p],
                rest: Cow::Owned(rest.clone()),
            };
            let (x, y) = (name(&a), name(&b));
            prop_assert_eq!(x.cmp(&y), x.to_string().cmp(&y.to_string()));
            prop_assert_eq!(x == y, x.to_string() == y.to_string());
        }

        #[test]
        fn strings_are_escaped_as_serde_json_does(text in "(.|[\\x00-\\x1f\"\\\\]){0,24}") {
            let mut ours = b"\"".to_vec();
            write_escaped(&mut ours, &text);
            ours.push(b'"');
            prop_assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(&text).unwrap());
        }

        #[test]
        fn a_target_read_back_equals_its_original(
            tags in arb_tags(),
            instances in proptest::collection::vec(arb_instance(), 0..6),
        ) {
            let instances = shared(instances);
            let out = build_all([ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances, rule: None, host_ports: None }]);
            let groups: Vec<Group> = serde_json::from_slice(&render(out.targets.iter())).unwrap();
            let back = from_groups(groups);
            prop_assert_eq!(back.len(), out.targets.len());
            for (b, t) in back.iter().zip(out.targets.iter()) {
                prop_assert_eq!(b, t);
                prop_assert_eq!(b.content_hash(), t.content_hash());
                prop_assert_eq!(b.label_map(), t.label_map());
            }
        }

        #[test]
        fn no_tags_make_a_target_a_collector_refuses(
            tags in arb_tags(),
            instances in proptest::collection::vec(arb_instance(), 1..3),
        ) {
            let instances = shared(instances);
            let out = build_all([ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances, rule: None, host_ports: None }]);
            for t in out.targets.iter() {
                let millis = |name| t.label(name).map(parse_prometheus_duration);
                match (millis("__scrape_interval__"), millis("__scrape_timeout__")) {
                    (None, None) => {}
                    (Some(Some(i)), Some(Some(o))) => prop_assert!(i > 0 && o > 0 && o <= i, "{t:?}"),
                    other => prop_assert!(false, "{other:?} in {t:?}"),
                }
                prop_assert!(matches!(t.label("__scheme__"), None | Some("http") | Some("https")));
            }
            // Scheme, interval and timeout tags never change which targets exist.
            let mut bare = tags.clone();
            bare.retain(|k, _| !k.ends_with("_SCHEME") && !k.ends_with("_INTERVAL") && !k.ends_with("_TIMEOUT"));
            let without = build_all([ServiceData { namespace: "ns", service: "svc", tags: &bare, instances: &instances, rule: None, host_ports: None }]);
            let ids = |o: &BuildOutput| o.targets.iter().map(|t| (t.source, t.address.clone())).collect::<Vec<_>>();
            prop_assert_eq!(ids(&out), ids(&without));
        }

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
            instances in proptest::collection::vec(arb_instance(), 0..8),
        ) {
            let mut instances = shared(instances);
            let svc = ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances, rule: None, host_ports: None };
            let out = build_all([svc]);
            for t in out.targets.iter() {
                for name in t.label_map().keys() {
                    prop_assert!(valid_label_name(name), "{name:?}");
                }
                let names: Vec<String> = t.labels().iter().map(|(n, _)| n.to_string()).collect();
                prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted and unique: {names:?}");
                let (ip, port) = t.address.rsplit_once(':').unwrap();
                prop_assert!(ip.parse::<Ipv4Addr>().is_ok());
                prop_assert!(port.parse::<u16>().map(|p| p > 0).unwrap_or(false));
                prop_assert_eq!(t.label("instance"), Some(ip));
            }
            // At most two targets per instance, and only instances with an IPv4.
            prop_assert!(out.targets.len() <= 2 * instances.len());
            let body = render(out.targets.iter());
            instances.reverse();
            let again = build_all([ServiceData { namespace: "ns", service: "svc", tags: &tags, instances: &instances, rule: None, host_ports: None }]);
            prop_assert_eq!(render(again.targets.iter()), body);
        }
    }

    /// Tags of a bridge-mode service, and two tasks on one host.
    fn bridge() -> (BTreeMap<String, String>, Vec<Arc<Instance>>) {
        let mut tags = post_tags();
        tags.insert(TAG_NETWORK_MODE.into(), "bridge".into());
        let task = |id: &str| {
            let mut inst = post_instance();
            inst.id = id.into();
            inst.attributes.insert(ATTR_PORT, "32768");
            inst
        };
        (tags, shared([task("task-a"), task("task-b")]))
    }

    fn addresses(out: &BuildOutput) -> Vec<(String, MetricsSource, String)> {
        out.targets
            .iter()
            .map(|t| (t.instance_id.to_string(), t.source, t.address.to_string()))
            .collect()
    }

    #[test]
    fn bridge_mode_reaches_container_ports_through_host_ports() {
        let (tags, instances) = bridge();
        let lookup = |inst: &Instance, port: u16| -> Result<u16, NoHostPort> {
            match (&*inst.id, port) {
                ("task-a", 3000) => Ok(32768),
                ("task-a", 9779) => Ok(32769),
                ("task-b", 3000) => Ok(32770),
                ("task-b", _) => Err(NoHostPort::NotBound),
                _ => Err(NoHostPort::Unknown("?".into())),
            }
        };
        let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
        svc.host_ports = Some(HostPorts(&lookup));
        let out = build_all([svc]);
        assert_eq!(
            addresses(&out),
            [
                (
                    "task-a".into(),
                    MetricsSource::App,
                    "10.10.101.12:32768".into()
                ),
                (
                    "task-a".into(),
                    MetricsSource::EcsExporter,
                    "10.10.101.12:32769".into()
                ),
                (
                    "task-b".into(),
                    MetricsSource::App,
                    "10.10.101.12:32770".into()
                ),
            ]
        );
        // The exporter of task-b is skipped and reported, never guessed.
        assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
        let text = out.problems[0].to_string();
        for part in [
            "task \"task-b\"",
            "container port 9779",
            "ECS_METRICS_PORT",
            "no TCP host port",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // Without bridge mode, the lookup is never asked.
        for mode in [None, Some("awsvpc"), Some("HOST")] {
            let mut tags = tags.clone();
            match mode {
                Some(m) => tags.insert(TAG_NETWORK_MODE.into(), m.into()),
                None => tags.remove(TAG_NETWORK_MODE),
            };
            let never = |_: &Instance, _: u16| -> Result<u16, NoHostPort> { panic!("asked") };
            let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
            svc.host_ports = Some(HostPorts(&never));
            let out = build_all([svc]);
            assert!(out.problems.is_empty(), "{:?}", out.problems);
            assert!(addresses(&out).iter().all(|(_, src, addr)| addr
                == if *src == MetricsSource::App {
                    "10.10.101.12:3000"
                } else {
                    "10.10.101.12:9779"
                }));
            assert_eq!(mapped_ports(&tags), None);
        }
        assert_eq!(mapped_ports(&tags), Some(vec![3000, 9779]));
    }

    #[test]
    fn bridge_mode_port_from_the_registration_needs_no_mapping() {
        let (mut tags, instances) = bridge();
        tags.remove("METRICS_PORT");
        tags.remove("ECS_METRICS_PORT");
        assert_eq!(mapped_ports(&tags), Some(vec![]));
        let never = |_: &Instance, _: u16| -> Result<u16, NoHostPort> { panic!("asked") };
        let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
        svc.host_ports = Some(HostPorts(&never));
        let out = build_all([svc]);
        // AWS_INSTANCE_PORT is the host port ECS registered.
        assert!(addresses(&out)
            .iter()
            .all(|(_, _, a)| a == "10.10.101.12:32768"));
        assert_eq!(out.targets.len(), 2);
    }

    #[test]
    fn unmapped_tasks_are_counted_per_port_and_reason() {
        let (tags, instances) = bridge();
        let gone = |_: &Instance, _: u16| -> Result<u16, NoHostPort> {
            Err(NoHostPort::TaskNotFound {
                cluster: "c".into(),
            })
        };
        let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
        svc.host_ports = Some(HostPorts(&gone));
        let out = build_all([svc]);
        assert!(out.targets.is_empty());
        assert_eq!(out.problems.len(), 2, "one per port: {:?}", out.problems);
        let text = out.problems[0].to_string();
        assert!(text.contains("2 tasks (first \"task-a\")"), "{text}");
        assert!(
            text.contains("does not know the task in cluster \"c\""),
            "{text}"
        );
    }

    #[test]
    fn a_bad_network_mode_is_reported_and_treated_as_awsvpc() {
        let (mut tags, instances) = bridge();
        tags.insert(TAG_NETWORK_MODE.into(), "bridged".into());
        let never = |_: &Instance, _: u16| -> Result<u16, NoHostPort> { panic!("asked") };
        let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
        svc.host_ports = Some(HostPorts(&never));
        let out = build_all([svc]);
        assert_eq!(out.targets.len(), 4);
        assert_eq!(out.problems.len(), 1);
        assert!(out.problems[0]
            .to_string()
            .contains("NETWORK_MODE=\"bridged\""));
    }

    #[test]
    fn a_rule_value_is_named_as_the_rule_s() {
        let mut tags = post_tags();
        tags.insert("METRICS_INTERVAL".into(), "2s".into());
        tags.insert("METRICS_TIMEOUT".into(), "5s".into());
        let instances = shared([post_instance()]);
        let mut svc = ServiceData::tagged("ns", "svc", &tags, &instances);
        let from_rule: &[&str] = &["METRICS_TIMEOUT"];
        svc.rule = Some((3, from_rule));
        let out = build_all([svc]);
        let text = out.problems[0].to_string();
        assert!(
            text.contains("METRICS_TIMEOUT=\"5s\" (from discovery rule 3)"),
            "{text}"
        );
        assert!(!text.contains("tag METRICS_TIMEOUT"), "{text}");
    }
}
