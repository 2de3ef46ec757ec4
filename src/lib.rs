//! shard-sd: Prometheus `http_sd` / `file_sd` service discovery of Amazon ECS
//! workloads registered in AWS Cloud Map.
//!
//! Data flow: [`discovery`] reads the namespace list (SSM or static) and Cloud
//! Map; [`targets`] turns instances and tags into target groups; [`app`]
//! publishes them into [`state`]; [`output`] serves them to collectors.
//! With a lease table, [`coordination`] elects a fenced leader and assigns shard
//! slots to replicas through DynamoDB leases, and [`cluster`] does the sharded
//! serving: the leader assigns, every other replica follows its changes.

pub mod app;
pub mod aws;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordination;
pub mod discovery;
pub mod events;
pub mod identity;
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
///
/// Trimming walks every free chunk under the allocator's lock, so it runs on a
/// thread of its own, never on the runtime's, at most once per
/// [`TRIM_SPACING`]: requests meanwhile are folded into one trim after it.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::mpsc::{sync_channel, SyncSender};
        static TRIMMER: std::sync::OnceLock<Option<SyncSender<()>>> = std::sync::OnceLock::new();
        let trimmer = TRIMMER.get_or_init(|| {
            let (requests, pending) = sync_channel::<()>(1);
            std::thread::Builder::new()
                .name("shard-sd-trim".into())
                .spawn(move || {
                    while pending.recv().is_ok() {
                        // SAFETY: malloc_trim only returns free pages of glibc's own heaps.
                        unsafe {
                            libc::malloc_trim(0);
                        }
                        std::thread::sleep(TRIM_SPACING);
                    }
                })
                .ok()
                .map(|_| requests)
        });
        if let Some(requests) = trimmer {
            // Full: a trim is pending already and will cover this one.
            let _ = requests.try_send(());
        }
    }
}

/// Has the allocator map every block of 256 KiB or more on its own and hand it
/// back when freed. Without it glibc raises that threshold to the largest block
/// freed so far (up to 32 MiB), after which the transient lists, frames and
/// JSON of each change stay on the heap and resident size follows the largest
/// change rather than what is held. Called once, at start-up, by the binary.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of glibc's allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// See [`release_free_memory`].
pub const TRIM_SPACING: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    #[test]
    fn freeing_memory_never_waits_for_the_trim() {
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            super::release_free_memory();
        }
        // Requests fold into one pending trim on its own thread.
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
    }
}
