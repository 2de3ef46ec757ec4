//! Who this replica is and how peers reach it. In ECS both come from the task
//! metadata endpoint (`ECS_CONTAINER_METADATA_URI_V4`): the task ARN is a unique,
//! stable replica id and the task's private IPv4 is where peers connect. Outside
//! ECS: hostname and pid, and 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub replica_id: String,
    pub advertise_addr: String,
}

#[derive(Debug, Default, Deserialize)]
struct TaskMetadata {
    #[serde(rename = "TaskARN", default)]
    task_arn: Option<String>,
    #[serde(rename = "Containers", default)]
    containers: Vec<ContainerMetadata>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerMetadata {
    #[serde(rename = "Networks", default)]
    networks: Vec<Network>,
}

#[derive(Debug, Default, Deserialize)]
struct Network {
    #[serde(rename = "IPv4Addresses", default)]
    ipv4_addresses: Vec<String>,
}

/// Reads `<metadata uri>/task`. `None` outside ECS or when the endpoint fails.
async fn task_metadata() -> Option<TaskMetadata> {
    let base = std::env::var("ECS_CONTAINER_METADATA_URI_V4").ok()?;
    let url = format!("{}/task", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .ok()?;
    let result = async {
        client
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .json::<TaskMetadata>()
            .await
    };
    match result.await {
        Ok(meta) => Some(meta),
        Err(err) => {
            tracing::warn!(
                "cannot read ECS task metadata from {url}: {err}; using hostname and 127.0.0.1"
            );
            None
        }
    }
}

/// Resolves the replica id and advertised address. Explicit values win.
pub async fn resolve(
    replica_id: Option<&str>,
    advertise_addr: Option<&str>,
    listen: SocketAddr,
) -> Identity {
    let needs_metadata = replica_id.is_none() || advertise_addr.is_none();
    let meta = if needs_metadata {
        task_metadata().await
    } else {
        None
    }
    .unwrap_or_default();
    let replica_id = replica_id
        .map(str::to_owned)
        .or(meta.task_arn.filter(|a| !a.is_empty()))
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let advertise_addr = advertise_addr.map(str::to_owned).unwrap_or_else(|| {
        let ip = meta
            .containers
            .iter()
            .flat_map(|c| &c.networks)
            .flat_map(|n| &n.ipv4_addresses)
            .find(|ip| !ip.is_empty())
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".into());
        format!("{ip}:{}", listen.port())
    });
    Identity {
        replica_id,
        advertise_addr,
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".into())
}
