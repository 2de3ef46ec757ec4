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

/// Hands the heap's free pages back to the system after a large list was built,
/// assigned or received: the allocator keeps freed memory for reuse, so without
/// this a replica's resident size follows its largest transient, not what it holds.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keeps the allocator to two arenas. glibc gives each thread that allocates an
/// arena of its own (up to eight per core); long-lived targets built on one
/// thread beside another thread's transient buffers then pin pages that no trim
/// returns. Called first thing, before any thread starts.
pub fn limit_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: a tuning parameter of glibc's malloc, set before other threads run.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
