//! Host ports of bridge-mode ECS tasks. In bridge mode ECS registers the EC2
//! host's address in Cloud Map, and a container port named by `METRICS_PORT`
//! is reached through a host port ECS picked when the task started. Only ECS
//! `DescribeTasks` (`containers[].networkBindings`) tells it.
//!
//! A task's bindings never change, so each task is asked about once: when its
//! Cloud Map instance (whose id is the task id) is first seen, up to
//! [`DESCRIBE_TASKS_MAX`] tasks per call, in the cluster its `ECS_CLUSTER_NAME`
//! attribute names. Known tasks cost nothing; services in `awsvpc` or `host`
//! mode never call ECS.
//!
//! A task ECS has not answered for (no answer, throttled, a server error)
//! leaves its service not fully read, so that nothing is published for the
//! first time without it and its service keeps its last targets, for at most
//! [`UNANSWERED_LIMIT`]; then it is skipped and reported like a task ECS does
//! not know, and asked about again every turn.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aws::AwsCallError;
use crate::targets::{Instance, NoHostPort, TaskPorts, ATTR_CLUSTER};

/// The most tasks one `DescribeTasks` call may name.
pub const DESCRIBE_TASKS_MAX: usize = 100;
/// When a task ECS could not describe (unknown, access denied, not an ECS
/// task) is asked about again.
pub const RETRY_AFTER: Duration = Duration::from_secs(60);
/// How long a task ECS has not answered for holds its service back.
pub const UNANSWERED_LIMIT: Duration = Duration::from_secs(60);
/// How soon a task ECS has not answered for is asked about again, within
/// [`UNANSWERED_LIMIT`] ([`RETRY_AFTER`] after it): an ECS that does not answer
/// costs a call's timeout per attempt.
pub const UNANSWERED_RETRY: Duration = Duration::from_secs(5);

/// What is known of one task's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEntry {
    Known(Arc<TaskPorts>),
    /// Not known, for this reason; asked again from `retry_at`.
    Failed {
        why: NoHostPort,
        retry_at: Instant,
    },
    /// Asked about since `since` without an answer (the last failure: `why`);
    /// asked again from `retry_at`.
    Unanswered {
        since: Instant,
        retry_at: Instant,
        why: String,
    },
}

/// The tasks of one service's instances, by instance (task) id.
pub type TaskCache = BTreeMap<Arc<str>, TaskEntry>;

/// The host port of `container_port` of `instance`'s task, from `cache`.
pub fn host_port(
    cache: &TaskCache,
    instance: &Instance,
    container_port: u16,
) -> Result<u16, NoHostPort> {
    match cache.get(&instance.id) {
        Some(TaskEntry::Known(ports)) => ports.host_port(container_port),
        Some(TaskEntry::Failed { why, .. }) => Err(why.clone()),
        Some(TaskEntry::Unanswered { why, .. }) => Err(NoHostPort::Unknown(why.clone())),
        None => Err(NoHostPort::Unknown(
            "ECS DescribeTasks has not been asked about it yet".to_owned(),
        )),
    }
}

/// What [`refresh`] did.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Entries were added or replaced: the service's targets must be built again.
    pub changed: bool,
    /// Some task is still waiting for an answer (see [`pending`]).
    pub pending: bool,
    pub errors: Vec<AwsCallError>,
}

/// Brings `cache` in line with `instances` within one service's turn: forgets
/// tasks gone, and asks ECS about tasks never seen (and failed ones due again).
/// `wanted` is false for a service whose tasks need no mapping: its cache is
/// emptied and nothing is asked.
pub async fn refresh(
    ecs: &aws_sdk_ecs::Client,
    cache: &mut TaskCache,
    instances: &[Arc<Instance>],
    wanted: bool,
) -> Refreshed {
    let mut out = Refreshed::default();
    if !wanted {
        cache.clear();
        return out;
    }
    let now = Instant::now();
    let (asks, changed) = due(cache, instances, now);
    out.changed = changed;
    for (cluster, ids) in asks {
        let (answers, errors) = ask(ecs, &cluster, &ids, now).await;
        out.changed |= store(cache, answers);
        out.errors.extend(errors);
    }
    out.pending = pending(cache, instances, Instant::now());
    out
}

/// Forgets the tasks of `cache` no longer among `instances`, and returns those
/// ECS must be asked about now (never seen, unanswered, or failed and due), by
/// cluster. An instance that cannot be asked about (no cluster attribute, an id
/// that is no ECS task id) gets its entry at once; whether that changed
/// anything is returned too.
pub fn due(
    cache: &mut TaskCache,
    instances: &[Arc<Instance>],
    now: Instant,
) -> (BTreeMap<String, Vec<Arc<str>>>, bool) {
    let present: std::collections::BTreeSet<&str> = instances.iter().map(|i| &*i.id).collect();
    cache.retain(|id, _| present.contains(&**id));
    let mut changed = false;
    let mut by_cluster: BTreeMap<String, Vec<Arc<str>>> = BTreeMap::new();
    for inst in instances {
        let due = match cache.get(&inst.id) {
            None => true,
            Some(TaskEntry::Known(_)) => false,
            Some(TaskEntry::Failed { retry_at, .. } | TaskEntry::Unanswered { retry_at, .. }) => {
                *retry_at <= now
            }
        };
        if !due {
            continue;
        }
        let cluster = inst
            .attributes
            .get(ATTR_CLUSTER)
            .map(str::trim)
            .filter(|c| !c.is_empty());
        let cannot = if !is_task_id(&inst.id) {
            Some(NoHostPort::NotATask)
        } else if cluster.is_none() {
            Some(NoHostPort::NoCluster)
        } else {
            None
        };
        match (cannot, cluster) {
            (Some(why), _) => {
                let entry = TaskEntry::Failed {
                    why,
                    retry_at: now + RETRY_AFTER,
                };
                changed |= store(cache, [(inst.id.clone(), entry)]);
            }
            (None, Some(cluster)) => by_cluster
                .entry(cluster.to_owned())
                .or_default()
                .push(inst.id.clone()),
            (None, None) => {}
        }
    }
    (by_cluster, changed)
}

/// Asks ECS about tasks `ids` of `cluster`, in calls of at most
/// [`DESCRIBE_TASKS_MAX`]. Returns an entry for each task and the calls that
/// failed: a lasting error (a missing permission, an unknown cluster) answers
/// its tasks with it, a passing one (throttled, no answer, a server error)
/// leaves them unanswered.
pub async fn ask(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    ids: &[Arc<str>],
    now: Instant,
) -> (Vec<(Arc<str>, TaskEntry)>, Vec<AwsCallError>) {
    let mut answers = Vec::with_capacity(ids.len());
    let mut errors = Vec::new();
    for chunk in ids.chunks(DESCRIBE_TASKS_MAX) {
        match describe(ecs, cluster, chunk).await {
            Ok(entries) => answers.extend(chunk.iter().cloned().zip(entries)),
            Err(err) => {
                // Worded without the call's size: the same fault reads the same.
                let why = format!("{} in cluster {cluster:?}", err.brief());
                let entry = if is_lasting(&err) {
                    TaskEntry::Failed {
                        why: NoHostPort::Unknown(why),
                        retry_at: now + RETRY_AFTER,
                    }
                } else {
                    TaskEntry::Unanswered {
                        since: now,
                        retry_at: now + UNANSWERED_RETRY,
                        why,
                    }
                };
                answers.extend(chunk.iter().map(|id| (id.clone(), entry.clone())));
                errors.push(err);
            }
        }
    }
    (answers, errors)
}

/// Stores entries; returns whether any differs from what was known for
/// building targets (a new retry time, or another unanswered attempt, does
/// not). A task left unanswered again keeps the time it was first, and is
/// asked about less often past [`UNANSWERED_LIMIT`]; a task that had an answer
/// (one not to build from yet, such as a task still starting) keeps it.
pub fn store(
    cache: &mut TaskCache,
    answers: impl IntoIterator<Item = (Arc<str>, TaskEntry)>,
) -> bool {
    let mut changed = false;
    for (id, entry) in answers {
        let entry = match (cache.get(&id), entry) {
            (
                Some(TaskEntry::Unanswered { since: first, .. }),
                TaskEntry::Unanswered {
                    since: attempt,
                    why,
                    ..
                },
            ) => TaskEntry::Unanswered {
                since: *first,
                retry_at: if attempt >= *first + UNANSWERED_LIMIT {
                    attempt + RETRY_AFTER
                } else {
                    attempt + UNANSWERED_RETRY
                },
                why,
            },
            (Some(TaskEntry::Failed { why, .. }), TaskEntry::Unanswered { since: attempt, .. }) => {
                TaskEntry::Failed {
                    why: why.clone(),
                    retry_at: attempt + UNANSWERED_RETRY,
                }
            }
            (_, entry) => entry,
        };
        changed |= cache.get(&id).is_none_or(|e| !same_reason(e, &entry));
        cache.insert(id, entry);
    }
    changed
}

/// Whether some instance's task is waiting for ECS: never asked about, or
/// unanswered for less than [`UNANSWERED_LIMIT`].
pub fn pending(cache: &TaskCache, instances: &[Arc<Instance>], now: Instant) -> bool {
    instances.iter().any(|i| match cache.get(&i.id) {
        None => true,
        Some(TaskEntry::Unanswered { since, .. }) => now < *since + UNANSWERED_LIMIT,
        Some(_) => false,
    })
}

/// Entries alike for building targets.
fn same_reason(a: &TaskEntry, b: &TaskEntry) -> bool {
    match (a, b) {
        (TaskEntry::Known(x), TaskEntry::Known(y)) => x == y,
        (TaskEntry::Failed { why: x, .. }, TaskEntry::Failed { why: y, .. }) => x == y,
        (TaskEntry::Unanswered { .. }, TaskEntry::Unanswered { .. }) => true,
        _ => false,
    }
}

/// Errors that a retry in a second would meet again.
fn is_lasting(err: &AwsCallError) -> bool {
    match err.code.as_deref() {
        None => false,
        Some(code) => {
            !(code.contains("Throttl")
                || code.contains("LimitExceeded")
                || code.contains("TooManyRequests")
                || code.contains("ServerException")
                || code.contains("InternalFailure")
                || code.contains("ServiceUnavailable"))
        }
    }
}

/// Whether `id` can be an ECS task id: 32 hex digits, or a UUID (the older
/// format). Any other instance id was not registered by ECS, and asking about
/// it could fail the whole call it is in.
fn is_task_id(id: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    match id.len() {
        32 => hex(id),
        36 => {
            let parts: Vec<&str> = id.split('-').collect();
            parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12]) && parts.iter().all(|p| hex(p))
        }
        _ => false,
    }
}

/// One `DescribeTasks` call: an entry per id, in order.
async fn describe(
    ecs: &aws_sdk_ecs::Client,
    cluster: &str,
    ids: &[Arc<str>],
) -> Result<Vec<TaskEntry>, AwsCallError> {
    let resp = ecs
        .describe_tasks()
        .cluster(cluster)
        .set_tasks(Some(ids.iter().map(|id| id.to_string()).collect()))
        .send()
        .await
        .map_err(|err| {
            AwsCallError::new(
                "ecs:DescribeTasks",
                "ecs:DescribeTasks",
                format!("{} task(s) of cluster {cluster:?}", ids.len()),
                &err,
            )
        })?;
    let now = Instant::now();
    let mut found: BTreeMap<&str, TaskEntry> = BTreeMap::new();
    for task in resp.tasks() {
        let Some(id) = task.task_arn().map(last_segment) else {
            continue;
        };
        found.insert(id, task_entry(task, now));
    }
    for failure in resp.failures() {
        let Some(id) = failure.arn().map(last_segment) else {
            continue;
        };
        let why = match failure.reason() {
            Some("MISSING") | None => NoHostPort::TaskNotFound {
                cluster: cluster.to_owned(),
            },
            Some(reason) => NoHostPort::Unknown(format!(
                "ECS DescribeTasks answered {reason}{}",
                failure
                    .detail()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )),
        };
        found.entry(id).or_insert(TaskEntry::Failed {
            why,
            retry_at: now + RETRY_AFTER,
        });
    }
    Ok(ids
        .iter()
        .map(|id| {
            found.remove(&**id).unwrap_or_else(|| TaskEntry::Failed {
                // Neither described nor listed as a failure.
                why: NoHostPort::TaskNotFound {
                    cluster: cluster.to_owned(),
                },
                retry_at: now + RETRY_AFTER,
            })
        })
        .collect())
}

/// A described task's entry. Bindings are reported once the task runs: until
/// then it is asked about again at the next turn, whatever it has bound so far.
fn task_entry(task: &aws_sdk_ecs::types::Task, now: Instant) -> TaskEntry {
    let starting = |status: &str| matches!(status, "PROVISIONING" | "PENDING" | "ACTIVATING");
    // A container still starting (one that depends on another) may not have
    // bound its ports yet either.
    let status = task
        .containers()
        .iter()
        .filter_map(|c| c.last_status())
        .find(|s| starting(s))
        .or(task.last_status())
        .unwrap_or_default();
    if starting(status) {
        return TaskEntry::Failed {
            why: NoHostPort::Unknown(format!(
                "the task is {status}; its host ports are known once it runs"
            )),
            retry_at: now,
        };
    }
    let mut ports = TaskPorts::default();
    for binding in task.containers().iter().flat_map(|c| c.network_bindings()) {
        if binding
            .protocol()
            .is_some_and(|p| *p != aws_sdk_ecs::types::TransportProtocol::Tcp)
        {
            continue;
        }
        let ipv6 = binding.bind_ip().is_some_and(|ip| ip.contains(':'));
        let port = |p: Option<i32>| p.and_then(|p| u16::try_from(p).ok());
        if let (Some(container), Some(host)) =
            (port(binding.container_port()), port(binding.host_port()))
        {
            ports.bind((container, container), host, ipv6);
        } else if let (Some(container), Some(host)) = (
            binding.container_port_range().and_then(parse_range),
            binding.host_port_range().and_then(parse_range),
        ) {
            // Ranges of equal length map port to port.
            if container.1 - container.0 == host.1 - host.0 {
                ports.bind(container, host.0, ipv6);
            }
        }
    }
    TaskEntry::Known(Arc::new(ports))
}

/// The id at the end of an ARN (`arn:aws:ecs:...:task/cluster/ID`), or the id itself.
fn last_segment(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// `"9000-9010"` (or `"9000"`) as (first, last).
fn parse_range(text: &str) -> Option<(u16, u16)> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last).then_some((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ecs::types::{Container, NetworkBinding, Task, TransportProtocol};

    #[test]
    fn ranges_and_ids() {
        assert_eq!(parse_range("9000-9010"), Some((9000, 9010)));
        assert_eq!(parse_range("80"), Some((80, 80)));
        assert_eq!(parse_range("10-9"), None);
        assert_eq!(parse_range("a-b"), None);
        assert_eq!(
            last_segment("arn:aws:ecs:us-east-1:1:task/c/abc123"),
            "abc123"
        );
        assert_eq!(last_segment("abc123"), "abc123");
        assert!(is_task_id("0dc5c05b56df432ab6ff2f52f4019000"));
        assert!(is_task_id("3891c1ab-0cbe-4b4f-8b77-9e97b41dd1b0"));
        for not in [
            "task-1",
            "",
            "0dc5c05b56df432ab6ff2f52f401900g",
            "3891c1ab0cbe-4b4f-8b77-9e97b41dd1b0-",
        ] {
            assert!(!is_task_id(not), "{not}");
        }
    }

    #[test]
    fn bindings_map_container_ports_to_host_ports() {
        let mut ports = TaskPorts::default();
        ports.bind((8080, 8080), 32768, false);
        // The same binding twice is one.
        ports.bind((8080, 8080), 32768, false);
        ports.bind((9000, 9010), 40000, false);
        ports.bind((7000, 7000), 32770, false);
        ports.bind((7000, 7000), 32771, false);
        assert_eq!(ports.host_port(8080), Ok(32768));
        assert_eq!(ports.host_port(9005), Ok(40005));
        assert_eq!(ports.host_port(9011), Err(NoHostPort::NotBound));
        assert_eq!(
            ports.host_port(7000),
            Err(NoHostPort::Ambiguous(vec![32770, 32771]))
        );
        // A range that would run past 65535 is not taken.
        let mut past = TaskPorts::default();
        past.bind((1000, 2000), 65000, false);
        assert!(past.is_empty());
        // IPv4 wins over an IPv6 binding to another host port (the address
        // registered is IPv4); IPv6 alone is taken.
        let mut dual = TaskPorts::default();
        dual.bind((3000, 3000), 32769, true);
        dual.bind((3000, 3000), 32768, false);
        dual.bind((4000, 4000), 32800, true);
        assert_eq!(dual.host_port(3000), Ok(32768));
        assert_eq!(dual.host_port(4000), Ok(32800));
    }

    fn binding(ip: &str, container: i32, host: i32, protocol: TransportProtocol) -> NetworkBinding {
        NetworkBinding::builder()
            .bind_ip(ip)
            .container_port(container)
            .host_port(host)
            .protocol(protocol)
            .build()
    }

    #[test]
    fn a_task_reads_as_its_tcp_bindings_once_it_runs() {
        let task = |status: &str| {
            Task::builder()
                .task_arn("arn:aws:ecs:us-east-1:1:task/c/0dc5c05b56df432ab6ff2f52f4019000")
                .last_status(status)
                .containers(
                    Container::builder()
                        .name("app")
                        .network_bindings(binding("0.0.0.0", 3000, 32768, TransportProtocol::Tcp))
                        .network_bindings(binding("::", 3000, 32768, TransportProtocol::Tcp))
                        .network_bindings(binding("0.0.0.0", 5000, 32790, TransportProtocol::Udp))
                        .build(),
                )
                .containers(
                    Container::builder()
                        .name("exporter")
                        .network_bindings(
                            NetworkBinding::builder()
                                .container_port_range("9000-9002")
                                .host_port_range("41000-41002")
                                .protocol(TransportProtocol::Tcp)
                                .build(),
                        )
                        .build(),
                )
                .build()
        };
        let now = Instant::now();
        let TaskEntry::Known(ports) = task_entry(&task("RUNNING"), now) else {
            panic!("a running task is known");
        };
        assert_eq!(ports.host_port(3000), Ok(32768));
        assert_eq!(ports.host_port(9001), Ok(41001));
        assert_eq!(
            ports.host_port(5000),
            Err(NoHostPort::NotBound),
            "UDP is no target"
        );
        // Pending, even with some bindings: asked again at the next turn.
        match task_entry(&task("PENDING"), now) {
            TaskEntry::Failed { retry_at, why } => {
                assert_eq!(retry_at, now);
                assert!(matches!(why, NoHostPort::Unknown(w) if w.contains("PENDING")));
            }
            other => panic!("{other:?}"),
        }
    }

    fn instance(id: &str, cluster: Option<&str>) -> Arc<Instance> {
        let mut attributes: crate::targets::Attributes =
            [("AWS_INSTANCE_IPV4", "10.0.0.1")].into_iter().collect();
        if let Some(c) = cluster {
            attributes.insert(ATTR_CLUSTER, c);
        }
        Arc::new(Instance {
            id: id.into(),
            attributes,
        })
    }

    #[test]
    fn due_asks_only_about_tasks_it_must() {
        let now = Instant::now();
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let c = "c".repeat(32);
        let instances = vec![
            instance(&a, Some("one")),
            instance(&b, Some("two")),
            instance(&c, Some("one")),
            instance("manual-1", Some("one")),
            instance(&"d".repeat(32), None),
        ];
        let mut cache = TaskCache::new();
        cache.insert("gone".into(), TaskEntry::Known(Arc::default()));
        cache.insert(c.as_str().into(), TaskEntry::Known(Arc::default()));
        let (asks, changed) = due(&mut cache, &instances, now);
        assert!(changed, "entries for what cannot be asked");
        assert!(!cache.contains_key("gone"), "tasks gone are forgotten");
        let asked: Vec<(&str, Vec<&str>)> = asks
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().map(|i| &**i).collect()))
            .collect();
        assert_eq!(
            asked,
            [("one", vec![a.as_str()]), ("two", vec![b.as_str()])]
        );
        assert_eq!(
            host_port(&cache, &instances[3], 3000),
            Err(NoHostPort::NotATask)
        );
        assert_eq!(
            host_port(&cache, &instances[4], 3000),
            Err(NoHostPort::NoCluster)
        );
        // Asked again only once due.
        let (asks, changed) = due(&mut cache, &instances, now + Duration::from_secs(1));
        assert_eq!(asks.values().map(Vec::len).sum::<usize>(), 2);
        assert!(!changed);
        let (asks, _) = due(&mut cache, &instances, now + RETRY_AFTER);
        assert_eq!(asks.values().map(Vec::len).sum::<usize>(), 2, "a, b");
        assert!(pending(&cache, &instances, now), "a and b never answered");
    }

    #[test]
    fn an_unanswered_task_holds_its_service_back_for_a_limited_time() {
        let t0 = Instant::now();
        let id = "a".repeat(32);
        let instances = vec![instance(&id, Some("one"))];
        let mut cache = TaskCache::new();
        let unanswered = |at| TaskEntry::Unanswered {
            since: at,
            retry_at: at + UNANSWERED_RETRY,
            why: "no answer".into(),
        };
        assert!(store(&mut cache, [(id.as_str().into(), unanswered(t0))]));
        // Later failures keep the first time, and are no change to build.
        let later = t0 + Duration::from_secs(30);
        assert!(!store(
            &mut cache,
            [(id.as_str().into(), unanswered(later))]
        ));
        assert!(pending(&cache, &instances, later));
        assert!(!pending(&cache, &instances, t0 + UNANSWERED_LIMIT));
        // Asked again soon within the limit, every minute past it.
        let (asks, _) = due(&mut cache, &instances, later + Duration::from_secs(1));
        assert!(asks.is_empty());
        let (asks, _) = due(&mut cache, &instances, later + UNANSWERED_RETRY);
        assert_eq!(asks["one"].len(), 1);
        let past = t0 + UNANSWERED_LIMIT;
        assert!(!store(&mut cache, [(id.as_str().into(), unanswered(past))]));
        let (asks, _) = due(&mut cache, &instances, past + UNANSWERED_RETRY);
        assert!(asks.is_empty(), "a minute apart past the limit");
        let (asks, _) = due(&mut cache, &instances, past + RETRY_AFTER);
        assert_eq!(asks["one"].len(), 1);
        // A task with an answer keeps it when asked again without one.
        let other = "b".repeat(32);
        let starting = TaskEntry::Failed {
            why: NoHostPort::Unknown("the task is PENDING".into()),
            retry_at: t0,
        };
        store(&mut cache, [(other.as_str().into(), starting.clone())]);
        assert!(!store(
            &mut cache,
            [(other.as_str().into(), unanswered(later))]
        ));
        assert!(
            matches!(&cache[other.as_str()], TaskEntry::Failed { why, .. } if *why == NoHostPort::Unknown("the task is PENDING".into()))
        );
        let both = vec![instance(&other, Some("one"))];
        assert!(
            !pending(&cache, &both, later),
            "not waiting: it had an answer"
        );
        // An answer at last is a change.
        let known = TaskEntry::Known(Arc::new(TaskPorts::default()));
        assert!(store(&mut cache, [(id.as_str().into(), known)]));
        assert!(!pending(&cache, &instances, later));
    }

    #[test]
    fn lasting_errors_are_told_from_passing_ones() {
        let err = |code: Option<&str>| AwsCallError {
            operation: "ecs:DescribeTasks",
            resource: String::new(),
            code: code.map(str::to_owned),
            detail: String::new(),
            hint: String::new(),
        };
        for lasting in [
            "AccessDeniedException",
            "ClusterNotFoundException",
            "InvalidParameterException",
        ] {
            assert!(is_lasting(&err(Some(lasting))), "{lasting}");
        }
        for passing in [
            None,
            Some("ThrottlingException"),
            Some("ServerException"),
            Some("InternalFailure"),
        ] {
            assert!(!is_lasting(&err(passing)), "{passing:?}");
        }
    }
}
