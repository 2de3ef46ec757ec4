//! ECS task events, read from an SQS queue that an EventBridge rule fills
//! (`EVENTS_QUEUE_URL`): the trigger for re-reading the Cloud Map services a task
//! belongs to at once, instead of at the next poll.
//!
//! An event is only ever a trigger, never a source of targets: it carries no
//! Cloud Map instance id or port, arrives at least once and unordered, and the
//! Cloud Map registration may trail it. So this module only parses tolerantly,
//! drops what it has seen (per task, by `detail.version`), and hands the
//! (cluster, service) pairs to the discovery loop, which re-reads those services
//! and checks again on a short schedule until their revision moves.
//!
//! A message is deleted once the discovery loop has handled it, so a consumer
//! that dies before that (a leader's SIGKILL) leaves it to be delivered again to
//! the next; a malformed one is deleted at once, logged once and counted. When
//! the queue cannot be read the loop falls back to polling every
//! `EVENTS_FALLBACK_FREQUENCY`, and comes back by itself.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::aws::AwsCallError;
use crate::discovery::ServiceKey;
use crate::telemetry::Metrics;

/// How long one `ReceiveMessage` waits for messages (SQS's longest).
pub const LONG_POLL: Duration = Duration::from_secs(20);
/// A receive that has not answered this long after its long poll is stalled.
pub const STALL_MARGIN: Duration = Duration::from_secs(5);
/// How long a batch's messages are kept from other readers while the discovery
/// loop works on it (a wait for the rest of a burst and one read of each
/// service it names; more when a cycle is running): if it has not answered by
/// then, they are delivered again.
const HANDLED_WITHIN: Duration = Duration::from_secs(20);
/// How long before the end of a batch's hold the finisher gives up waiting.
const PUT_BACK_MARGIN: Duration = Duration::from_secs(2);
/// How soon a batch that was not handled is delivered again.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Tasks whose last version is remembered, at most; older ones are forgotten
/// first (a redelivery that old only costs a re-read).
const REMEMBERED_TASKS: usize = 20_000;

/// The one detail type that is a task's state change.
pub const DETAIL_TYPE: &str = "ECS Task State Change";

/// What an event says about a task, as far as shard-sd cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskEvent {
    /// `detail.taskArn`.
    pub task: String,
    /// The cluster's name, from `detail.clusterArn`.
    pub cluster: Option<String>,
    /// The ECS service, from `detail.group` = `service:NAME`.
    pub service: Option<String>,
    pub last_status: Option<String>,
    /// `detail.version`: orders the events of one task.
    pub version: Option<u64>,
    /// The event's `time`.
    pub time: Option<SystemTime>,
}

/// Why a message is not a task event shard-sd can use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// Not an event at all: logged once, counted as malformed.
    #[error("message is not an EventBridge event ({0}); deleted")]
    Malformed(&'static str),
    /// An event of another kind, or of a task that is not a service's: counted
    /// as ignored (the rule should not send them).
    #[error("{0}; ignored")]
    Ignored(String),
}

/// Reads one SQS message body. Unknown or missing fields never fail it; only a
/// body that is not a JSON object with a `detail.taskArn` does.
pub fn parse(body: &str) -> Result<TaskEvent, Unusable> {
    let event: Value = serde_json::from_str(body).map_err(|_| Unusable::Malformed("not JSON"))?;
    if !event.is_object() {
        return Err(Unusable::Malformed("not a JSON object"));
    }
    if let Some(kind) = event.get("detail-type").and_then(Value::as_str) {
        if kind != DETAIL_TYPE {
            return Err(Unusable::Ignored(format!("event of type {kind:?}")));
        }
    }
    let detail = event
        .get("detail")
        .filter(|d| d.is_object())
        .ok_or(Unusable::Malformed("no detail object"))?;
    let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let task = text(detail, "taskArn")
        .filter(|t| !t.is_empty())
        .ok_or(Unusable::Malformed("no detail.taskArn"))?;
    let service = text(detail, "group")
        .and_then(|g| g.strip_prefix("service:").map(str::to_owned))
        .filter(|s| !s.is_empty());
    if service.is_none() {
        return Err(Unusable::Ignored(format!(
            "task {task} belongs to no ECS service"
        )));
    }
    let version = detail.get("version").and_then(|v| match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    });
    let time = text(&event, "time")
        .or_else(|| text(detail, "updatedAt"))
        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok());
    Ok(TaskEvent {
        task,
        cluster: text(detail, "clusterArn").map(|arn| cluster_name(&arn)),
        service,
        last_status: text(detail, "lastStatus"),
        version,
        time,
    })
}

/// The name in a cluster ARN (`arn:aws:ecs:region:account:cluster/NAME`), or
/// the text itself when it is a name already.
pub fn cluster_name(arn: &str) -> String {
    arn.rsplit_once('/')
        .map_or(arn, |(_, name)| name)
        .to_owned()
}

/// The last version seen of each task: an event of a version already seen (a
/// duplicate delivery, or one overtaken by a later one) changes nothing.
#[derive(Debug, Default)]
pub struct Versions {
    seen: HashMap<String, (u64, Instant)>,
}

impl Versions {
    /// Whether `event` is newer than every event of its task seen before (an
    /// event without a version always is), and remembers it.
    pub fn fresh(&mut self, event: &TaskEvent) -> bool {
        let Some(version) = event.version else {
            return true;
        };
        if self
            .seen
            .get(&event.task)
            .is_some_and(|(known, _)| *known >= version)
        {
            return false;
        }
        if self.seen.len() >= REMEMBERED_TASKS {
            self.forget_oldest();
        }
        self.seen
            .insert(event.task.clone(), (version, Instant::now()));
        true
    }

    /// The last version seen of `task`.
    pub fn version_of(&self, task: &str) -> Option<u64> {
        self.seen.get(task).map(|(v, _)| *v)
    }

    /// Puts back what `task` had before (a batch that was not handled will be
    /// delivered again, and must then be fresh again).
    pub fn restore(&mut self, task: &str, previous: Option<u64>) {
        match previous {
            Some(v) => {
                self.seen.insert(task.to_owned(), (v, Instant::now()));
            }
            None => {
                self.seen.remove(task);
            }
        }
    }

    /// Forgets the oldest half.
    fn forget_oldest(&mut self) {
        let mut ages: Vec<Instant> = self.seen.values().map(|(_, at)| *at).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 2];
        self.seen.retain(|_, (_, at)| *at > cut);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// An ECS service, as instances name it: `ECS_CLUSTER_NAME` (when the event
/// said) and `ECS_SERVICE_NAME`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EcsService {
    pub cluster: Option<String>,
    pub service: String,
}

/// What the consumer hands the discovery loop: the services a batch of events
/// touched, the oldest event time, and a way to say whether it was handled
/// (every service it names re-read without error).
#[derive(Debug)]
pub struct Batch {
    pub services: BTreeSet<EcsService>,
    pub oldest: Option<SystemTime>,
    pub handled: oneshot::Sender<bool>,
}

/// When a service an event named is read again while its revision has not
/// moved, counted from the first read: the Cloud Map registration can trail
/// the task's event by a few seconds.
pub const RECHECKS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(10),
];

/// Services to read again on the [`RECHECKS`] schedule.
#[derive(Debug, Default)]
pub struct Rechecks {
    /// Per service: when its schedule started, the next step, and the oldest
    /// event time that led to it.
    pending: HashMap<ServiceKey, (Instant, usize, Option<SystemTime>)>,
}

impl Rechecks {
    /// Starts (or starts again) `key`'s schedule from `origin`.
    pub fn start(&mut self, key: ServiceKey, origin: Instant, event: Option<SystemTime>) {
        let event = match self.pending.get(&key) {
            Some((_, _, Some(known))) => Some(event.map_or(*known, |e| e.min(*known))),
            _ => event,
        };
        self.pending.insert(key, (origin, 0, event));
    }

    /// The next time a service is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|(origin, step, _)| *origin + RECHECKS[*step])
            .min()
    }

    /// The services due at `now`, each moved to its next step (or dropped after
    /// the last), and the oldest event time among them.
    pub fn take_due(&mut self, now: Instant) -> (BTreeSet<ServiceKey>, Option<SystemTime>) {
        let mut due = BTreeSet::new();
        let mut oldest: Option<SystemTime> = None;
        self.pending.retain(|key, (origin, step, event)| {
            if *origin + RECHECKS[*step] > now {
                return true;
            }
            due.insert(key.clone());
            oldest = match (oldest, *event) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // Steps overdue already (the loop was busy) are one read, not several.
            while *step < RECHECKS.len() && *origin + RECHECKS[*step] <= now {
                *step += 1;
            }
            *step < RECHECKS.len()
        });
        (due, oldest)
    }

    /// Whether `key` has checks to come.
    pub fn contains(&self, key: &ServiceKey) -> bool {
        self.pending.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Whether the queue is being read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not started yet, or no queue configured.
    Starting,
    Consuming,
    /// The queue could not be read: polling at the fallback frequency.
    Fallback {
        since: SystemTime,
        error: String,
    },
}

impl Health {
    pub fn is_fallback(&self) -> bool {
        matches!(self, Health::Fallback { .. })
    }
}

/// Where events come from.
#[derive(Clone, Debug)]
pub struct EventsSource {
    pub sqs: aws_sdk_sqs::Client,
    pub queue_url: String,
    /// How often to poll while the queue cannot be read.
    pub fallback: Duration,
}

/// A batch handed over, waiting for the loop's word.
struct Waiting {
    done: oneshot::Receiver<bool>,
    /// Until when its messages are kept from other readers.
    held_until: tokio::time::Instant,
    handles: Vec<String>,
    /// The versions it took, to put back if it is not handled.
    taken: Vec<(String, Option<u64>)>,
}

/// Reads the queue until `shutdown`: hands each batch of fresh events to
/// `batches`; its messages are deleted once the loop says it was handled, or
/// made visible again soon if not. Reports whether the queue can be read on
/// `health`.
pub async fn consume(
    source: EventsSource,
    batches: mpsc::Sender<Batch>,
    health: watch::Sender<Health>,
    metrics: std::sync::Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Versions::default()));
    // Waiting for the loop runs beside receiving: a batch is handled only once
    // the checks after its events are over (about 10 s).
    let (waiting_tx, waiting) = mpsc::unbounded_channel();
    tokio::spawn(finish(
        source.clone(),
        waiting,
        versions.clone(),
        shutdown.clone(),
    ));
    let mut logged_malformed: BTreeSet<&'static str> = BTreeSet::new();
    let mut backoff = Duration::from_secs(1);
    // A missing queue or permission is said at once, not after a long poll.
    let check = source
        .sqs
        .get_queue_attributes()
        .queue_url(&source.queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send();
    match check.await {
        Ok(_) => recover(&health, &metrics),
        Err(err) => {
            let err = AwsCallError::new(
                "GetQueueAttributes",
                "sqs:GetQueueAttributes",
                &source.queue_url,
                &err,
            );
            fall_back(&health, &metrics, &source.queue_url, err.to_string());
        }
    }
    loop {
        let receive = source
            .sqs
            .receive_message()
            .queue_url(&source.queue_url)
            .wait_time_seconds(LONG_POLL.as_secs() as i32)
            .max_number_of_messages(10)
            .send();
        let answer = tokio::select! {
            answer = tokio::time::timeout(LONG_POLL + STALL_MARGIN, receive) => answer,
            _ = shutdown.cancelled() => return,
        };
        let messages = match answer {
            Ok(Ok(out)) => out.messages.unwrap_or_default(),
            failed => {
                let error = match failed {
                    Ok(Err(err)) => AwsCallError::new(
                        "ReceiveMessage",
                        "sqs:ReceiveMessage",
                        &source.queue_url,
                        &err,
                    )
                    .to_string(),
                    _ => format!(
                        "ReceiveMessage stalled: no answer within {:?}",
                        LONG_POLL + STALL_MARGIN
                    ),
                };
                fall_back(&health, &metrics, &source.queue_url, error);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        recover(&health, &metrics);
        let mut services = BTreeSet::new();
        let mut oldest: Option<SystemTime> = None;
        // Messages of the batch, and those done with at once.
        let (mut handles, mut done_with) = (Vec::new(), Vec::new());
        let mut taken: Vec<(String, Option<u64>)> = Vec::new();
        for message in messages {
            let Some(receipt) = message.receipt_handle else {
                continue;
            };
            let parsed = parse(message.body.as_deref().unwrap_or(""));
            let fresh = match &parsed {
                Ok(event) => {
                    let mut versions = lock(&versions);
                    let previous = versions.version_of(&event.task);
                    let fresh = versions.fresh(event);
                    if fresh {
                        taken.push((event.task.clone(), previous));
                    }
                    fresh
                }
                Err(_) => false,
            };
            match parsed {
                Ok(event) if fresh => {
                    metrics.event("fresh");
                    oldest = match (oldest, event.time) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    if let Some(service) = event.service {
                        services.insert(EcsService {
                            cluster: event.cluster,
                            service,
                        });
                    }
                    handles.push(receipt);
                }
                Ok(_) => {
                    metrics.event("duplicate");
                    done_with.push(receipt);
                }
                Err(Unusable::Ignored(why)) => {
                    tracing::debug!("event {why}");
                    metrics.event("ignored");
                    done_with.push(receipt);
                }
                Err(Unusable::Malformed(why)) => {
                    if logged_malformed.insert(why) {
                        tracing::warn!(
                            queue = %source.queue_url,
                            "a message in EVENTS_QUEUE_URL is not an ECS task event ({why}): \
                             deleted; check what the EventBridge rule sends there"
                        );
                    }
                    metrics.event("malformed");
                    done_with.push(receipt);
                }
            }
        }
        delete(&source, done_with).await;
        if services.is_empty() {
            delete(&source, handles).await;
            continue;
        }
        let (handled, done) = oneshot::channel();
        let batch = Batch {
            services,
            oldest,
            handled,
        };
        // Not to be delivered again while the loop works on it (its checks
        // take about 10 s, more than a short visibility timeout).
        let held_until = tokio::time::Instant::now() + HANDLED_WITHIN;
        set_visibility(&source, &handles, HANDLED_WITHIN).await;
        if batches.send(batch).await.is_err() {
            // The loop stopped: back to the queue at once, for the next leader.
            set_visibility(&source, &handles, Duration::ZERO).await;
            return;
        }
        let _ = waiting_tx.send(Waiting {
            done,
            held_until,
            handles,
            taken,
        });
    }
}

/// Deletes each batch's messages once the loop says it was handled; otherwise
/// puts back the versions it took and has its messages delivered again soon.
/// Stopping (the term ended) hands what is still waiting back to the queue at
/// once, for the next leader.
async fn finish(
    source: EventsSource,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    versions: std::sync::Arc<std::sync::Mutex<Versions>>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = waiting.recv() => next,
            _ = shutdown.cancelled() => None,
        };
        let Some(batch) = next else { break };
        let handled = tokio::select! {
            // A little before the hold ends, so that the put-back comes first.
            done = tokio::time::timeout_at(batch.held_until - PUT_BACK_MARGIN, batch.done) => {
                matches!(done, Ok(Ok(true)))
            }
            _ = shutdown.cancelled() => {
                set_visibility(&source, &batch.handles, Duration::ZERO).await;
                break;
            }
        };
        if handled {
            delete(&source, batch.handles).await;
        } else if shutdown.is_cancelled() {
            set_visibility(&source, &batch.handles, Duration::ZERO).await;
            break;
        } else {
            {
                let mut versions = lock(&versions);
                for (task, previous) in batch.taken.into_iter().rev() {
                    versions.restore(&task, previous);
                }
            }
            set_visibility(&source, &batch.handles, RETRY_AFTER).await;
        }
    }
    // What was handed over and not finished goes back to the queue now.
    waiting.close();
    while let Ok(batch) = waiting.try_recv() {
        set_visibility(&source, &batch.handles, Duration::ZERO).await;
    }
}

fn lock(versions: &std::sync::Mutex<Versions>) -> std::sync::MutexGuard<'_, Versions> {
    versions.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes handled messages, ten at a time; one that cannot be deleted is
/// delivered again and read as a duplicate.
async fn delete(source: &EventsSource, handles: Vec<String>) {
    if handles.is_empty() {
        return;
    }
    for chunk in handles.chunks(10) {
        let mut request = source
            .sqs
            .delete_message_batch()
            .queue_url(&source.queue_url);
        for (i, handle) in chunk.iter().enumerate() {
            match aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .build()
            {
                Ok(entry) => request = request.entries(entry),
                Err(err) => tracing::debug!("delete entry: {err}"),
            }
        }
        match request.send().await {
            Ok(out) if out.failed.is_empty() => {}
            Ok(out) => tracing::debug!(
                "DeleteMessageBatch on {}: {} not deleted; they come back as duplicates",
                source.queue_url,
                out.failed.len()
            ),
            Err(err) => tracing::warn!(
                "{}; the messages come back as duplicates",
                AwsCallError::new(
                    "DeleteMessageBatch",
                    "sqs:DeleteMessage",
                    &source.queue_url,
                    &err
                )
            ),
        }
    }
}

/// Makes messages visible again `after` from now instead of after the queue's
/// visibility timeout; if that fails, they come back after it.
async fn set_visibility(source: &EventsSource, handles: &[String], after: Duration) {
    for chunk in handles.chunks(10) {
        let mut request = source
            .sqs
            .change_message_visibility_batch()
            .queue_url(&source.queue_url);
        for (i, handle) in chunk.iter().enumerate() {
            if let Ok(entry) =
                aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(handle)
                    .visibility_timeout(after.as_secs() as i32)
                    .build()
            {
                request = request.entries(entry);
            }
        }
        if let Err(err) = request.send().await {
            tracing::debug!(
                "{}; the messages come back after the queue's visibility timeout",
                AwsCallError::new(
                    "ChangeMessageVisibilityBatch",
                    "sqs:ChangeMessageVisibility",
                    &source.queue_url,
                    &err
                )
            );
        }
    }
}

fn fall_back(health: &watch::Sender<Health>, metrics: &Metrics, queue: &str, error: String) {
    health.send_if_modified(|h| {
        if h.is_fallback() {
            return false;
        }
        tracing::warn!(
            queue,
            "cannot read EVENTS_QUEUE_URL ({error}): polling Cloud Map every \
             EVENTS_FALLBACK_FREQUENCY until it can (check the queue, and the task role's \
             sqs:ReceiveMessage and sqs:DeleteMessage on it)"
        );
        *h = Health::Fallback {
            since: SystemTime::now(),
            error,
        };
        true
    });
    metrics.events_fallback.set(1);
}

fn recover(health: &watch::Sender<Health>, metrics: &Metrics) {
    health.send_if_modified(|h| {
        if *h == Health::Consuming {
            return false;
        }
        if h.is_fallback() {
            tracing::info!("reading EVENTS_QUEUE_URL again: events drive discovery");
        }
        *h = Health::Consuming;
        true
    });
    metrics.events_fallback.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(detail: &str) -> String {
        format!(
            r#"{{"version":"0","id":"e1","detail-type":"ECS Task State Change","source":"aws.ecs",
               "time":"2026-12-03T17:55:30Z","region":"us-east-1","detail":{detail}}}"#
        )
    }

    #[test]
    fn reads_a_task_state_change_as_ecs_sends_it() {
        let body = event(
            r#"{"clusterArn":"arn:aws:ecs:us-east-1:123456789012:cluster/prod",
                "taskArn":"arn:aws:ecs:us-east-1:123456789012:task/prod/abc","group":"service:web",
                "lastStatus":"RUNNING","desiredStatus":"RUNNING","version":3,
                "attachments":[{"type":"eni","details":[]}],"containers":[],"unknown":{"x":1}}"#,
        );
        let parsed = parse(&body).expect("event");
        assert_eq!(parsed.cluster.as_deref(), Some("prod"));
        assert_eq!(parsed.service.as_deref(), Some("web"));
        assert_eq!(parsed.version, Some(3));
        assert_eq!(parsed.last_status.as_deref(), Some("RUNNING"));
        assert_eq!(
            parsed.time,
            Some(humantime::parse_rfc3339("2026-12-03T17:55:30Z").unwrap())
        );
    }

    #[test]
    fn missing_fields_never_fail_an_event() {
        // No cluster, version, time, status or detail-type: still a trigger.
        let parsed = parse(r#"{"detail":{"taskArn":"t1","group":"service:web","version":"7"}}"#)
            .expect("event");
        assert_eq!(parsed.cluster, None);
        assert_eq!(parsed.version, Some(7));
        assert_eq!(parsed.time, None);
    }

    #[test]
    fn what_is_not_a_service_task_event_is_told_apart() {
        for bad in [
            "",
            "not json",
            "[1,2]",
            r#"{"detail":"x"}"#,
            r#"{"detail":{"group":"service:a"}}"#,
        ] {
            assert!(matches!(parse(bad), Err(Unusable::Malformed(_))), "{bad:?}");
        }
        for other in [
            r#"{"detail-type":"ECS Container Instance State Change","detail":{"taskArn":"t"}}"#,
            r#"{"detail":{"taskArn":"t","group":"family:batch"}}"#,
            r#"{"detail":{"taskArn":"t"}}"#,
        ] {
            assert!(matches!(parse(other), Err(Unusable::Ignored(_))), "{other}");
        }
    }

    #[test]
    fn only_a_newer_version_of_a_task_is_fresh() {
        let mut versions = Versions::default();
        let at = |task: &str, version: Option<u64>| TaskEvent {
            task: task.into(),
            cluster: None,
            service: Some("web".into()),
            last_status: None,
            version,
            time: None,
        };
        assert!(versions.fresh(&at("a", Some(2))));
        assert!(!versions.fresh(&at("a", Some(2))), "a duplicate");
        assert!(!versions.fresh(&at("a", Some(1))), "overtaken");
        assert!(versions.fresh(&at("a", Some(3))));
        assert!(versions.fresh(&at("b", Some(1))), "another task");
        assert!(versions.fresh(&at("a", None)), "no version: cannot tell");
        assert_eq!(versions.len(), 2);
        // A batch not handled is put back: its events are fresh when delivered again.
        assert!(versions.fresh(&at("c", Some(1))));
        versions.restore("c", None);
        versions.restore("a", Some(2));
        assert!(versions.fresh(&at("c", Some(1))));
        assert!(versions.fresh(&at("a", Some(3))));
    }

    #[test]
    fn remembered_tasks_are_bounded() {
        let mut versions = Versions::default();
        for i in 0..(REMEMBERED_TASKS + 10) {
            versions.fresh(&TaskEvent {
                task: format!("t{i}"),
                cluster: None,
                service: Some("s".into()),
                last_status: None,
                version: Some(1),
                time: None,
            });
        }
        assert!(versions.len() <= REMEMBERED_TASKS);
    }

    #[test]
    fn rechecks_follow_the_schedule_to_its_end() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        let key = |s: &str| ("ns".to_owned(), s.to_owned());
        r.start(key("a"), t0, None);
        r.start(key("b"), t0, None);
        assert_eq!(r.next_due(), Some(t0 + RECHECKS[0]));
        assert!(r.take_due(t0).0.is_empty(), "nothing due yet");
        assert_eq!(r.take_due(t0 + RECHECKS[0]).0.len(), 2);
        assert_eq!(r.next_due(), Some(t0 + RECHECKS[1]));
        // "a" starts again (a newer event): "b" goes on alone.
        r.start(key("a"), t0 + RECHECKS[1], None);
        assert_eq!(r.take_due(t0 + RECHECKS[1]).0, BTreeSet::from([key("b")]));
        // At 10 s: "b"'s last check, and "a"'s first two at once (overdue
        // steps are one read, not several).
        assert_eq!(
            r.take_due(t0 + RECHECKS[2]).0,
            BTreeSet::from([key("a"), key("b")])
        );
        assert!(r.contains(&key("a")) && !r.contains(&key("b")));
        assert_eq!(r.next_due(), Some(t0 + RECHECKS[1] + RECHECKS[2]));
        assert_eq!(
            r.take_due(t0 + RECHECKS[1] + RECHECKS[2]).0,
            BTreeSet::from([key("a")])
        );
        assert!(r.is_empty());
    }

    #[test]
    fn rechecks_keep_the_oldest_event_time() {
        let mut r = Rechecks::default();
        let t0 = Instant::now();
        let (early, late) = (SystemTime::UNIX_EPOCH, SystemTime::now());
        r.start(("ns".into(), "a".into()), t0, Some(early));
        r.start(("ns".into(), "a".into()), t0, Some(late));
        assert_eq!(r.take_due(t0 + RECHECKS[0]).1, Some(early));
    }

    #[test]
    fn cluster_names_come_from_arns_or_names() {
        assert_eq!(cluster_name("arn:aws:ecs:us-east-1:1:cluster/prod"), "prod");
        assert_eq!(cluster_name("prod"), "prod");
    }
}
