//! `shard-sd probe URL`: a health check for container images that ship no curl.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("cannot reach {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
}

/// GETs `url`; `Ok` on a 2xx answer within 3 seconds.
pub async fn probe(url: &str) -> Result<(), ProbeError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .no_proxy()
        .build()
        .map_err(|source| ProbeError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|source| ProbeError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(ProbeError::Status {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        })
    }
}
