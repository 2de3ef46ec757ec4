//! The seeded schedule: which fault when, drawn before the run from `CHAOS_SEED`,
//! so a seed names the same sequence of actions every time (a shorter
//! `CHAOS_DURATION` gives a prefix of it). Which replica an action hits is
//! resolved when it runs, by role (the leader, a slot holder, a standby), from a
//! number drawn here.

use std::time::Duration;

use crate::common::proxy::{Fault, CLOUD_MAP_OPERATIONS};

#[derive(Clone, Debug)]
pub enum Who {
    Leader,
    Holder(u64),
    Standby(u64),
    Any(u64),
}

#[derive(Clone, Debug)]
pub enum Action {
    /// SIGKILL; a replacement task starts after `restart_after`.
    Kill { who: Who, restart_after: Duration },
    /// SIGTERM; the replacement starts first (a rolling deployment) or right after.
    Term { who: Who, replace_first: bool },
    /// SIGSTOP for `pause`, then SIGCONT.
    Pause { who: Who, pause: Duration },
    /// A fault between one replica (or, with `None`, every replica) and DynamoDB.
    DynamoDb {
        who: Option<Who>,
        fault: Fault,
        lasts: Duration,
    },
    /// A fault between the cluster and Cloud Map and SSM.
    CloudMap { fault: Fault, lasts: Duration },
    /// A network partition between one replica's peer listener and the others
    /// (DynamoDB and AWS still answer): followers cannot reach it if it leads.
    Partition { who: Who, lasts: Duration },
    /// New ECS tasks in service `service`, announced (or not) by their events.
    Register {
        service: usize,
        count: usize,
        announce: Announce,
    },
    /// A fault between the cluster and the events queue.
    Queue { fault: Fault, lasts: Duration },
    /// Tasks stopped: `count` registered tasks, picked by `pick`.
    Deregister { count: usize, pick: u64 },
    /// The second namespace is added to or removed from the SSM parameter.
    ToggleNamespace,
    /// The discovery rules parameter is made unreadable (`kind`: not JSON, an
    /// unknown field, a bad port) for `lasts`: the last good rules must stay.
    BreakRules { kind: u8, lasts: Duration },
}

/// How a registration's ECS task event reaches the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announce {
    /// After the registration, as usual.
    Event,
    /// Ahead of the registration (the registration trails its event).
    Early,
    /// Twice (EventBridge delivers at least once).
    Twice,
    /// Never: the safety-net cycle must find it.
    Lost,
}

/// Short names of faults, for reports.
pub fn fault_name(fault: &Fault) -> String {
    match fault {
        Fault::None => "none".into(),
        Fault::Throttle { code, .. } => format!("throttle {code}"),
        Fault::Fail { .. } => "http 500".into(),
        Fault::Error { op, code } => format!("{code} on {}", op.as_deref().unwrap_or("every call")),
        Fault::Hang => "stall".into(),
        Fault::DropResponse { op, .. } => {
            format!("lost {} responses", op.as_deref().unwrap_or("any"))
        }
        Fault::Delay { by, .. } => format!("latency {}ms", by.as_millis()),
        Fault::Partition => "partition".into(),
    }
}

/// A fault's kind in reports: latencies counted by whether a call still fits
/// its attempt timeout (slow but successful) or not.
fn fault_kind(fault: &Fault, attempt_timeout: Duration) -> String {
    match fault {
        Fault::Delay { by, .. } if *by < attempt_timeout => {
            "latency within the attempt timeout".into()
        }
        Fault::Delay { .. } => "latency past the attempt timeout".into(),
        other => fault_name(other),
    }
}

impl Action {
    /// The kind this action counts as in reports.
    pub fn kind(&self) -> String {
        match self {
            Action::Kill { .. } => "SIGKILL".into(),
            Action::Term { .. } => "SIGTERM".into(),
            Action::Pause { pause, .. } if *pause < crate::LEASE => "SIGSTOP < lease".into(),
            Action::Pause { .. } => "SIGSTOP > lease".into(),
            // The lease table's attempt timeout is the heartbeat; Cloud Map's AWS_CALL_TIMEOUT.
            Action::DynamoDb {
                who: Some(_),
                fault,
                ..
            } => format!(
                "DynamoDB one replica: {}",
                fault_kind(fault, crate::HEARTBEAT)
            ),
            Action::DynamoDb {
                who: None, fault, ..
            } => {
                format!(
                    "DynamoDB all replicas: {}",
                    fault_kind(fault, crate::HEARTBEAT)
                )
            }
            Action::CloudMap { fault, .. } => {
                format!("Cloud Map: {}", fault_kind(fault, crate::CALL_ATTEMPT))
            }
            Action::Partition { .. } => "peer partition".into(),
            Action::Register { .. } => "registration".into(),
            Action::Queue { fault, .. } => format!("SQS: {}", fault_name(fault)),
            Action::Deregister { .. } => "deregistration".into(),
            Action::ToggleNamespace => "SSM edit".into(),
            Action::BreakRules { .. } => "bad rules".into(),
        }
    }
}

fn ms(rng: &mut fastrand::Rng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.u64(range))
}

fn who(rng: &mut fastrand::Rng) -> Who {
    match rng.u8(0..10) {
        0..=3 => Who::Leader,
        4..=6 => Who::Holder(rng.u64(..)),
        7..=8 => Who::Standby(rng.u64(..)),
        _ => Who::Any(rng.u64(..)),
    }
}

fn dynamodb_fault(rng: &mut fastrand::Rng) -> Fault {
    match rng.u8(0..6) {
        0 => Fault::Hang,
        1 => Fault::Fail { op: None },
        2 => Fault::Throttle {
            op: None,
            remaining: u32::MAX,
            code: "ProvisionedThroughputExceededException".into(),
        },
        // Half of the latency faults keep every call under the SDK's attempt
        // timeout: lease steps slow down but succeed, and publish renewals late
        // (a leader's work once restarted its term on that and froze followers).
        3 => Fault::Delay {
            op: None,
            by: if rng.bool() {
                ms(rng, 250..480)
            } else {
                ms(rng, 500..2500)
            },
        },
        4 => Fault::DropResponse {
            op: Some(if rng.bool() { "UpdateItem" } else { "PutItem" }.into()),
            remaining: rng.u32(1..5),
        },
        _ => Fault::Error {
            op: None,
            code: "AccessDeniedException".into(),
        },
    }
}

fn cloud_map_fault(rng: &mut fastrand::Rng) -> Fault {
    match rng.u8(0..5) {
        0 => Fault::Hang,
        1 => Fault::Fail { op: None },
        2 => Fault::Throttle {
            op: [
                None,
                Some("DiscoverInstances"),
                Some("DiscoverInstancesRevision"),
            ][rng.usize(0..3)]
            .map(str::to_owned),
            remaining: u32::MAX,
            code: if rng.bool() {
                "RequestLimitExceeded"
            } else {
                "ThrottlingException"
            }
            .into(),
        },
        3 => Fault::Delay {
            op: None,
            by: ms(rng, 200..3000),
        },
        _ => Fault::Error {
            // SSM's GetParameter, or one of Cloud Map's.
            op: Some(match rng.usize(0..=CLOUD_MAP_OPERATIONS.len()) {
                0 => "GetParameter".into(),
                i => CLOUD_MAP_OPERATIONS[i - 1].into(),
            }),
            code: "AccessDeniedException".into(),
        },
    }
}

fn queue_fault(rng: &mut fastrand::Rng) -> Fault {
    match rng.u8(0..4) {
        0 => Fault::Error {
            op: Some("ReceiveMessage".into()),
            code: "AccessDenied".into(),
        },
        1 => Fault::Fail {
            op: Some("ReceiveMessage".into()),
        },
        // A receive that does not answer: a stall, noticed after the long poll.
        2 => Fault::Delay {
            op: Some("ReceiveMessage".into()),
            by: Duration::from_secs(30),
        },
        // Handled messages come back: duplicates.
        _ => Fault::Fail {
            op: Some("DeleteMessageBatch".into()),
        },
    }
}

fn announce(rng: &mut fastrand::Rng) -> Announce {
    match rng.u8(0..10) {
        0..=5 => Announce::Event,
        6 => Announce::Early,
        7..=8 => Announce::Twice,
        _ => Announce::Lost,
    }
}

fn draw(rng: &mut fastrand::Rng, services: usize) -> Action {
    match rng.u32(0..100) {
        0..=10 => Action::Kill {
            who: who(rng),
            restart_after: ms(rng, 0..2500),
        },
        11..=18 => Action::Term {
            who: who(rng),
            replace_first: rng.bool(),
        },
        19..=26 => Action::Pause {
            who: who(rng),
            pause: ms(rng, 300..2800),
        },
        27..=33 => Action::Pause {
            who: who(rng),
            pause: ms(rng, 3500..8000),
        },
        34..=46 => Action::DynamoDb {
            who: Some(who(rng)),
            fault: dynamodb_fault(rng),
            lasts: ms(rng, 500..9000),
        },
        47..=53 => Action::DynamoDb {
            who: None,
            fault: dynamodb_fault(rng),
            lasts: ms(rng, 500..8000),
        },
        54..=64 => Action::CloudMap {
            fault: cloud_map_fault(rng),
            lasts: ms(rng, 500..8000),
        },
        65..=71 => Action::Partition {
            who: who(rng),
            lasts: ms(rng, 500..8000),
        },
        72..=79 => Action::Register {
            service: rng.usize(0..services),
            count: rng.usize(1..4),
            announce: announce(rng),
        },
        80..=84 => Action::Queue {
            fault: queue_fault(rng),
            lasts: ms(rng, 500..8000),
        },
        85..=92 => Action::Deregister {
            count: rng.usize(1..4),
            pick: rng.u64(..),
        },
        93..=96 => Action::ToggleNamespace,
        _ => Action::BreakRules {
            kind: rng.u8(0..3),
            lasts: ms(rng, 500..8000),
        },
    }
}

/// The actions of a run of `duration` with `seed`, at their offsets from the start.
pub fn schedule(seed: u64, duration: Duration, services: usize) -> Vec<(Duration, Action)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut at = Duration::from_secs(1);
    let mut out = Vec::new();
    while at < duration {
        out.push((at, draw(&mut rng, services)));
        at += ms(&mut rng, 300..2500);
    }
    out
}
