//! shard-sd: Prometheus `http_sd` / `file_sd` service discovery of Amazon ECS
//! workloads registered in AWS Cloud Map.
//!
//! Data flow: [`discovery`] reads the namespace list (SSM or static) and Cloud
//! Map; [`targets`] turns instances and tags into target groups; [`app`]
//! publishes them into [`state`]; [`output`] serves them to collectors.
//! With a lease table, [`coordination`] elects a fenced leader and assigns shard
//! slots to replicas through DynamoDB leases.

pub mod app;
pub mod assignment;
pub mod aws;
pub mod clock;
pub mod config;
pub mod coordination;
pub mod discovery;
pub mod follower;
pub mod identity;
pub mod leader;
pub mod output;
pub mod plan;
pub mod probe;
pub mod sharding;
pub mod state;
pub mod targets;
pub mod telemetry;

/// Runs CPU-heavy work (building, assigning, rendering a large target list) so
/// that it does not hold up the runtime's other tasks, the lease renewals above
/// all: on a multi-threaded runtime the worker hands its other tasks over first.
pub(crate) fn cpu_bound<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}
