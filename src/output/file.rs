//! `FILE_BASED` mode: what this replica serves, written to `ecs-services.json`
//! for Prometheus `file_sd_configs`, with the same held-slot check as HTTP. Writes go to a temporary file in the same
//! directory and are renamed over the target, so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::{Serving, Shared};
use crate::targets::Body;

/// Delay before retrying a failed write.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Writes `bytes` to `path` atomically, creating the directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("targets.json");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes what this replica serves (see [`Shared::serving`]: in sharded mode
/// its own shard, `[]` once the slot is someone else's) to `path` on every
/// change, until shutdown.
pub async fn run(path: PathBuf, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut lists = shared.subscribe();
    let mut view = shared.coordination_receiver();
    // The ETag of the JSON written.
    let mut written: Option<String> = None;
    let mut view_open = true;
    loop {
        let body = match shared.serving() {
            Some(Serving::List(published)) => Some(published.body.clone()),
            Some(Serving::SomeoneElses) => Some(Body::empty()),
            None => None,
        };
        if let Some(body) = body.filter(|b| written.as_deref() != Some(b.etag())) {
            let target = path.clone();
            let etag = body.etag().to_owned();
            let targets = body.targets();
            let result = tokio::task::spawn_blocking(move || {
                // Our own output: inflating it cannot fail short of a defect.
                let json = body.json().map_err(std::io::Error::other)?;
                write_atomic(&target, &json)
            })
            .await;
            match result {
                Ok(Ok(())) => {
                    tracing::info!(path = %path.display(), targets, "wrote file_sd targets");
                    written = Some(etag);
                }
                Ok(Err(err)) => {
                    tracing::error!(
                        path = %path.display(),
                        "cannot write {}: {err}; check CONFIG_FILE_DIR and that the directory is \
                         writable by this user; retrying in {RETRY_AFTER:?}",
                        path.display()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_AFTER) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(err) => tracing::error!("file writer task failed: {err}"),
            }
        }
        tokio::select! {
            changed = lists.changed() => if changed.is_err() { return },
            // The slot may have become someone else's (deadlines included). A
            // single replica's view never changes (its sender is gone).
            changed = view.changed(), if view_open => view_open = changed.is_ok(),
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ecs-services.json");
        write_atomic(&path, b"[1]").unwrap();
        write_atomic(&path, b"[2]").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"[2]");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn reports_unwritable_directory() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"").unwrap();
        assert!(write_atomic(&blocker.join("ecs-services.json"), b"[]").is_err());
    }
}
