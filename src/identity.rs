//! Who this replica is and how peers reach it. In ECS both come from the task
//! metadata endpoint (`ECS_CONTAINER_METADATA_URI_V4`), read with retries: the
//! task ARN is a unique, stable replica id and the task's private IPv4 is where
//! peers connect. Outside ECS: hostname and pid. A sharded replica never guesses
//! its address: advertising 127.0.0.1 would make every follower poll itself.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub replica_id: String,
    pub advertise_addr: String,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot tell other replicas where to reach this one: {reason}; set ADVERTISE_ADDR to \
     this task's routable host:port of PEER_LISTEN_ADDR"
)]
pub struct NoAdvertiseAddr {
    reason: String,
}

/// Attempts at the task metadata endpoint, and the pause before the first retry
/// (doubled each time): about 8 s in all, while ECS finishes starting the task.
const METADATA_ATTEMPTS: u32 = 6;
const METADATA_FIRST_BACKOFF: Duration = Duration::from_millis(250);

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

/// Reads `<metadata uri>/task`, retrying with backoff. `Err` outside ECS or
/// when every attempt failed, saying why.
async fn task_metadata() -> Result<TaskMetadata, String> {
    let base = std::env::var("ECS_CONTAINER_METADATA_URI_V4")
        .map_err(|_| "ECS_CONTAINER_METADATA_URI_V4 is not set (not in ECS)".to_owned())?;
    let url = format!("{}/task", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let mut backoff = METADATA_FIRST_BACKOFF;
    let mut attempt = 1;
    loop {
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
            Ok(meta) => return Ok(meta),
            Err(err) if attempt >= METADATA_ATTEMPTS => {
                let msg = format!("cannot read ECS task metadata from {url}: {err}");
                tracing::warn!("{msg} (after {attempt} attempts)");
                return Err(msg);
            }
            Err(err) => {
                tracing::debug!(
                    attempt,
                    "reading ECS task metadata from {url} failed: {err}"
                );
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
        }
    }
}

/// The first IPv4 address of the task, if the metadata has one.
fn task_ipv4(meta: &TaskMetadata) -> Option<IpAddr> {
    meta.containers
        .iter()
        .flat_map(|c| &c.networks)
        .flat_map(|n| &n.ipv4_addresses)
        .find_map(|ip| ip.trim().parse::<IpAddr>().ok())
}

/// Resolves the replica id and advertised address. Explicit values win. With
/// `sharded`, an address that peers cannot route to (none found, loopback or
/// unspecified) is an error unless the operator set it explicitly.
pub async fn resolve(
    replica_id: Option<&str>,
    advertise_addr: Option<&str>,
    peer_port: u16,
    sharded: bool,
) -> Result<Identity, NoAdvertiseAddr> {
    let needs_metadata = replica_id.is_none() || advertise_addr.is_none();
    let meta = if needs_metadata {
        task_metadata().await
    } else {
        Err("not needed".to_owned())
    };
    let replica_id = replica_id
        .map(str::to_owned)
        .or_else(|| meta.as_ref().ok()?.task_arn.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let advertise_addr = match advertise_addr {
        Some(explicit) => explicit.to_owned(),
        None => {
            let ip = match &meta {
                Ok(meta) => task_ipv4(meta)
                    .ok_or_else(|| "the task metadata lists no IPv4 address".to_owned()),
                Err(reason) => Err(reason.clone()),
            };
            match ip {
                Ok(ip) if !sharded || (!ip.is_loopback() && !ip.is_unspecified()) => {
                    format!("{ip}:{peer_port}")
                }
                Ok(ip) => {
                    return Err(NoAdvertiseAddr {
                        reason: format!("the task's address {ip} is not routable"),
                    })
                }
                Err(reason) if sharded => return Err(NoAdvertiseAddr { reason }),
                // Single-replica mode: nobody connects to it; informational only.
                _ => format!("127.0.0.1:{peer_port}"),
            }
        }
    };
    Ok(Identity {
        replica_id,
        advertise_addr,
    })
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
