//! State shared between the discovery loop (the writer) and the outputs (the
//! readers): the published target list, pre-rendered once per change so that
//! serving it is a pointer copy, and the status shown on `/v1/status`.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;

use crate::coordination::CoordinationView;
use crate::discovery::NamespaceReport;
use crate::targets;

/// A rendered target list: the exact bytes every reader serves.
#[derive(Debug)]
pub struct Published {
    pub body: Bytes,
    pub etag: String,
    pub targets: usize,
}

/// The latest discovery cycle, as `/v1/status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LastDiscovery {
    pub time: String,
    pub outcome: &'static str,
    pub duration_ms: u64,
    pub aws_requests: u64,
    pub services_refreshed: usize,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStatus {
    pub last_discovery: Option<LastDiscovery>,
    /// Time of the last cycle without any error.
    pub last_success: Option<String>,
    pub namespaces: Vec<NamespaceReport>,
    /// Data problems that make shard-sd skip targets (bad tags, bad attributes).
    pub problems: Vec<String>,
    /// Instances without an `AWS_INSTANCE_IPV4` attribute (not ECS tasks).
    pub skipped_instances: usize,
}

/// Shared between tasks behind an `Arc`.
#[derive(Debug)]
pub struct Shared {
    pub replica_id: String,
    pub advertise_addr: String,
    coordination: watch::Receiver<CoordinationView>,
    targets: watch::Sender<Option<Arc<Published>>>,
    status: RwLock<DiscoveryStatus>,
}

impl Shared {
    /// `coordination` is the coordinator's view, or a fixed single-replica view.
    pub fn new(
        replica_id: String,
        advertise_addr: String,
        coordination: watch::Receiver<CoordinationView>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            replica_id,
            advertise_addr,
            coordination,
            targets: watch::Sender::new(None),
            status: RwLock::new(DiscoveryStatus::default()),
        })
    }

    /// The current list; `None` until the first complete discovery.
    pub fn targets(&self) -> Option<Arc<Published>> {
        self.targets.borrow().clone()
    }

    /// Notified on every change of the published list.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.targets.subscribe()
    }

    /// Publishes a rendered list; returns whether it differs from the current one.
    pub fn publish(&self, body: Vec<u8>, targets: usize) -> bool {
        let etag = targets::etag(&body);
        self.targets.send_if_modified(|current| {
            if current.as_ref().is_some_and(|p| p.etag == etag) {
                return false;
            }
            *current = Some(Arc::new(Published {
                body: Bytes::from(body),
                etag,
                targets,
            }));
            true
        })
    }

    /// The coordination view as of now (expired leases are not held).
    pub fn coordination(&self) -> CoordinationView {
        self.coordination.borrow().at(std::time::Instant::now())
    }

    pub fn is_ready(&self) -> bool {
        self.targets.borrow().is_some()
    }

    pub fn status(&self) -> DiscoveryStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut DiscoveryStatus)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }
}
