//! Both ends of the peer wire: paths, headers, the typed requests and answers,
//! the encoding of assignment changes, and the one peer client (token, timeouts,
//! size cap) every replica uses to talk to the leader.
//!
//! Replication is incremental. The leader keeps a bounded log of *frames*, one
//! per generation, each the targets that appeared in, moved between or left the
//! assignment; a replica asks for the changes after the generation it holds and
//! gets the frames since, or one whole frame when it is behind the log or the
//! term changed. A frame is gzip-compressed JSON lines of typed [`Record`]s:
//! targets travel as their fields and rendered labels, never as `http_sd` JSON,
//! and a replica renders its own shard from them.

use std::time::Duration;

use axum::http::HeaderName;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::sharding::{Slot, TargetId};
use crate::targets::{Interner, MetricsSource, Target};

/// The replication stream: `GET` with [`ChangesQuery`].
pub const CHANGES_PATH: &str = "/v1/changes";
/// One slot's shard as `http_sd` JSON, for replicas of earlier releases.
pub const SHARD_PATH: &str = "/v1/shards/{slot}";
/// The leader's view of every slot: [`AssignmentDoc`].
pub const ASSIGNMENT_PATH: &str = "/v1/assignment";

/// The content type of a changes answer (see [`encode_answer`]).
pub const CHANGES_CONTENT_TYPE: &str = "application/vnd.shard-sd.changes";

/// Headers of a shard answer on [`SHARD_PATH`].
pub const TERM_HEADER: HeaderName = HeaderName::from_static("x-shard-term");
pub const GENERATION_HEADER: HeaderName = HeaderName::from_static("x-shard-generation");

/// How long the leader holds a long-poll open.
pub const LONG_POLL: Duration = Duration::from_secs(20);

/// Longest long-poll a replica may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The most bytes a leader's answer may have: far above any assignment's
/// compressed size, far below what would hurt.
pub const MAX_PEER_BYTES: usize = 1 << 30;

/// What a replica asks the leader for, on [`CHANGES_PATH`] and [`SHARD_PATH`].
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ChangesQuery {
    /// The term and generation the asker holds (0, 0: nothing).
    #[serde(default)]
    pub after_term: u64,
    #[serde(default)]
    pub after: u64,
    #[serde(default)]
    pub wait_ms: u64,
    /// The asking replica; with `slot`, a confirmation that it holds the
    /// assignment of (`after_term`, `after`), counted only if the leader sees it
    /// holding that slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

impl ChangesQuery {
    /// Whether the asker should get (`term`, `generation`) at once, `latest`
    /// being the generation published last: it holds an older one, or one of
    /// this term never published here, which no answer would ever follow.
    pub fn lags(&self, term: u64, generation: u64, latest: u64) -> bool {
        (term, generation) > (self.after_term, self.after)
            || (self.after_term == term && self.after > latest)
    }
}

/// One slot of the assignment as of an answer's generation.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ShardHead {
    pub slot: u32,
    /// Generation at which this slot's targets last changed.
    pub generation: u64,
    pub targets: usize,
    /// Of those, how many are draining (moved away, kept until handed over).
    pub draining: usize,
    /// XXH3 over the content hashes of its targets in order (see
    /// [`content_of`]): the receiver checks the shard it rebuilt against it.
    pub content: u64,
}

/// The first line of a changes answer.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ChangesHead {
    pub term: u64,
    pub generation: u64,
    /// `true`: the frames are one whole copy, not changes after the asker's
    /// generation.
    pub whole: bool,
    /// The membership the assignment was computed for.
    pub slots: Vec<Slot>,
    pub shards: Vec<ShardHead>,
    pub frames: Vec<FrameHead>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct FrameHead {
    /// The generation this frame brings the assignment to.
    pub generation: u64,
    /// Length of its bytes after the head line.
    pub bytes: usize,
    /// XXH3 of those bytes: a garbled transfer is refused on receipt.
    pub hash: u64,
}

/// A frame as the leader logged it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub generation: u64,
    pub bytes: Bytes,
}

/// A target on the wire: its identity fields and, for a discovered target, its
/// instance's attributes and its source's path and scheme, from which the
/// receiver derives the very labels the leader renders; for any other target
/// (one read back from a copy), its labels as rendered.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct WireTarget {
    pub ns: String,
    pub svc: String,
    pub id: String,
    pub src: MetricsSource,
    pub addr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived: Option<Derived>,
}

/// What a discovered target's labels are derived from.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Derived {
    pub attrs: Vec<(String, String)>,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

impl WireTarget {
    pub fn of(t: &Target) -> WireTarget {
        let mut labels = Vec::new();
        // A target with a scrape interval or timeout goes as its labels: a
        // replica of the release before them would derive it without them,
        // find its shard unlike the leader's and keep asking for a whole copy.
        let derived = match t.derived_from().filter(|(_, scrape)| !scrape.has_timing()) {
            Some((instance, scrape)) => Some(Derived {
                attrs: instance
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                path: scrape.path.to_string(),
                scheme: scrape.scheme.map(str::to_owned),
            }),
            None => {
                labels.reserve(16);
                t.for_each_label(|name, value| labels.push((name.to_string(), value.to_owned())));
                None
            }
        };
        WireTarget {
            ns: t.namespace.to_string(),
            svc: t.service.to_string(),
            id: t.instance_id.to_string(),
            src: t.source,
            addr: t.address.to_string(),
            labels,
            derived,
        }
    }

    /// The identity of the target this describes (see [`crate::sharding::target_id`]),
    /// without making it.
    pub fn target_id(&self) -> TargetId {
        let label = |name: &str| {
            self.labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        use crate::targets::{DEFAULT_METRICS_PATH, DEFAULT_SCHEME};
        let (scheme, path) = match &self.derived {
            Some(d) => (
                d.scheme.as_deref().unwrap_or(DEFAULT_SCHEME),
                d.path.as_str(),
            ),
            None => (
                label("__scheme__").unwrap_or(DEFAULT_SCHEME),
                label("__metrics_path__").unwrap_or(DEFAULT_METRICS_PATH),
            ),
        };
        crate::sharding::target_id_of(scheme, &self.addr, path)
    }

    pub fn target(&self, strings: &mut Interner) -> Result<Target, ProtocolError> {
        let made = match &self.derived {
            Some(d) => {
                let instance = strings.instance(
                    &self.id,
                    d.attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                );
                Target::from_instance(
                    strings,
                    &self.ns,
                    &self.svc,
                    self.src,
                    &self.addr,
                    instance,
                    &d.path,
                    d.scheme.as_deref(),
                )
            }
            None => Target::from_parts(
                strings,
                &self.ns,
                &self.svc,
                &self.id,
                self.src,
                &self.addr,
                &self.labels,
            ),
        };
        made.ok_or_else(|| ProtocolError::Labels(self.addr.clone()))
    }
}

/// One change of the assignment. Slots are those serving the target after it,
/// draining ones included, ascending.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum Record {
    /// A target new to the assignment, or changed (its labels): whole.
    Put { t: WireTarget, slots: Vec<u32> },
    /// A target that left some of its slots, nothing else changed (a slot that
    /// gains a target gets a `Put`: its holder may not have it).
    Move { id: Id, slots: Vec<u32> },
    /// A target that left the assignment.
    Gone { id: Id },
}

/// A [`TargetId`] on the wire: 32 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Id(pub TargetId);

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:032x}", self.0 .0))
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        u128::from_str_radix(&s, 16)
            .map(|v| Id(TargetId(v)))
            .map_err(serde::de::Error::custom)
    }
}

/// Why a peer's answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("no head line")]
    NoHead,
    #[error("bad head: {0}")]
    Head(serde_json::Error),
    #[error("the frames' bytes do not add up to what the head says")]
    Length,
    #[error("the bytes of the frame of generation {0} are not those sent")]
    Garbled(u64),
    #[error("a frame does not inflate: {0}")]
    Gzip(std::io::Error),
    #[error("a frame holds a bad record: {0}")]
    Record(serde_json::Error),
    #[error("a frame holds a record longer than {} bytes", MAX_RECORD_BYTES)]
    RecordTooLong,
    #[error("the frames of an answer do not run from the copy held to generation {0}")]
    Discontinuous(u64),
    #[error("a change names target {0:032x}, which the copy does not hold")]
    Unknown(u128),
    #[error("target {0} has labels not sorted by name, or an unknown scheme")]
    Labels(String),
    #[error("changes after generation {after} of term {term} do not follow the copy held")]
    Gap { term: u64, after: u64 },
    #[error(
        "slot {slot}'s shard rebuilt from the changes is not the leader's ({targets} targets, \
         content {content:016x}; the leader has {leader_targets}, {leader_content:016x})"
    )]
    Diverged {
        slot: u32,
        targets: usize,
        content: u64,
        leader_targets: usize,
        leader_content: u64,
    },
}

/// XXH3 over the content hashes of `targets` in order: a shard's fingerprint.
pub fn content_of<'a>(targets: impl IntoIterator<Item = &'a Target>) -> u64 {
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    for t in targets {
        hash.update(&t.content_hash().to_le_bytes());
    }
    hash.digest()
}

/// Compresses `records` into one frame.
pub fn encode_frame(records: impl IntoIterator<Item = Record>) -> Bytes {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut line = Vec::with_capacity(512);
    for record in records {
        line.clear();
        // Serialising plain structs into a Vec cannot fail.
        if serde_json::to_writer(&mut line, &record).is_ok() {
            line.push(b'\n');
            let _ = gz.write_all(&line);
        }
    }
    Bytes::from(gz.finish().unwrap_or_default())
}

/// The longest record a frame may hold: far above any target's (a few hundred
/// bytes), so a frame without line ends cannot make a replica hold it whole.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Visits the records of a frame in order.
pub fn decode_frame(
    frame: &[u8],
    mut visit: impl FnMut(Record) -> Result<(), ProtocolError>,
) -> Result<(), ProtocolError> {
    use std::io::BufRead as _;
    let mut reader =
        std::io::BufReader::with_capacity(64 * 1024, flate2::read::MultiGzDecoder::new(frame));
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let n = std::io::Read::take(&mut reader, MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(ProtocolError::Gzip)?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_RECORD_BYTES {
            return Err(ProtocolError::RecordTooLong);
        }
        let record = serde_json::from_slice(&line).map_err(ProtocolError::Record)?;
        visit(record)?;
    }
}

/// A changes answer: the head line, then each frame's bytes as logged (nothing
/// is compressed again per asker).
pub fn encode_answer(mut head: ChangesHead, frames: &[Frame]) -> Vec<Bytes> {
    head.frames = frames
        .iter()
        .map(|f| FrameHead {
            generation: f.generation,
            bytes: f.bytes.len(),
            hash: xxhash_rust::xxh3::xxh3_64(&f.bytes),
        })
        .collect();
    let mut line = serde_json::to_vec(&head).unwrap_or_default();
    line.push(b'\n');
    std::iter::once(Bytes::from(line))
        .chain(frames.iter().map(|f| f.bytes.clone()))
        .collect()
}

/// Reads [`encode_answer`]'s bytes, checking each frame's length and hash.
pub fn decode_answer(bytes: &Bytes) -> Result<(ChangesHead, Vec<Frame>), ProtocolError> {
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(ProtocolError::NoHead)?;
    let head: ChangesHead =
        serde_json::from_slice(&bytes[..newline]).map_err(ProtocolError::Head)?;
    let mut at = newline + 1;
    let mut frames = Vec::with_capacity(head.frames.len());
    for f in &head.frames {
        let end = at.checked_add(f.bytes).ok_or(ProtocolError::Length)?;
        if end > bytes.len() {
            return Err(ProtocolError::Length);
        }
        let frame = bytes.slice(at..end);
        if xxhash_rust::xxh3::xxh3_64(&frame) != f.hash {
            return Err(ProtocolError::Garbled(f.generation));
        }
        frames.push(Frame {
            generation: f.generation,
            bytes: frame,
        });
        at = end;
    }
    if at != bytes.len() {
        return Err(ProtocolError::Length);
    }
    Ok((head, frames))
}

/// The leader's assignment as [`ASSIGNMENT_PATH`] serves it: per slot, its holder
/// (as the leader sees it) and what that holder confirmed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssignmentDoc {
    pub term: Option<u64>,
    pub generation: Option<u64>,
    pub slots: Vec<AssignedSlot>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AssignedSlot {
    pub slot: u32,
    pub holder: Option<String>,
    pub addr: Option<String>,
    pub targets: usize,
    pub draining: usize,
    pub generation: u64,
    pub confirmed_generation: u64,
    pub confirmed_holder: Option<String>,
}

/// What a changes request came back with.
pub enum ChangesAnswer {
    Changes {
        head: ChangesHead,
        frames: Vec<Frame>,
        /// Bytes received.
        received: usize,
    },
    /// Nothing newer within the wait.
    Unchanged,
    /// The leader is of an earlier release, without the replication stream.
    NotSupported,
    Failed(String),
}

/// A shard from a leader of an earlier release ([`SHARD_PATH`]).
pub enum ShardAnswer {
    Shard {
        term: u64,
        generation: u64,
        body: crate::targets::Body,
        received: usize,
    },
    Unchanged,
    Failed(String),
}

/// The one client of the peer routes: bearer token, timeouts, size cap.
#[derive(Clone, Debug)]
pub struct PeerClient {
    http: reqwest::Client,
    token: Option<String>,
}

impl PeerClient {
    pub fn new(token: Option<String>) -> Result<PeerClient, String> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build the HTTP client for peers: {e}"))?;
        Ok(PeerClient { http, token })
    }

    fn get(&self, url: String, timeout: Duration) -> reqwest::RequestBuilder {
        let req = self.http.get(url).timeout(timeout);
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// Long-polls the leader at `addr` for the changes after `query`'s generation.
    pub async fn changes(&self, addr: &str, query: &ChangesQuery) -> ChangesAnswer {
        let req = self
            .get(
                format!("http://{addr}{CHANGES_PATH}"),
                LONG_POLL + Duration::from_secs(5),
            )
            .query(query)
            .header(reqwest::header::ACCEPT, CHANGES_CONTENT_TYPE);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return ChangesAnswer::Failed(format!("cannot reach leader at {addr}: {e}")),
        };
        match resp.status() {
            reqwest::StatusCode::NOT_MODIFIED => return ChangesAnswer::Unchanged,
            reqwest::StatusCode::NOT_FOUND => return ChangesAnswer::NotSupported,
            s if !s.is_success() => {
                let text = resp.text().await.unwrap_or_default();
                return ChangesAnswer::Failed(format!(
                    "leader at {addr} answered {s}: {}",
                    text.trim()
                ));
            }
            _ => {}
        }
        let bytes = match read_capped(resp).await {
            Ok(bytes) => bytes,
            Err(e) => return ChangesAnswer::Failed(format!("reading changes from {addr}: {e}")),
        };
        match decode_answer(&bytes) {
            Ok((head, frames)) => ChangesAnswer::Changes {
                head,
                frames,
                received: bytes.len(),
            },
            Err(e) => ChangesAnswer::Failed(format!("leader at {addr} sent bad changes: {e}")),
        }
    }

    /// Long-polls a leader of an earlier release for one slot's shard.
    pub async fn shard(&self, addr: &str, slot: u32, query: &ChangesQuery) -> ShardAnswer {
        let req = self
            .get(
                format!("http://{addr}/v1/shards/{slot}"),
                LONG_POLL + Duration::from_secs(5),
            )
            .query(query)
            .header(reqwest::header::ACCEPT_ENCODING, "gzip");
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return ShardAnswer::Failed(format!("cannot reach leader at {addr}: {e}")),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return ShardAnswer::Unchanged;
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return ShardAnswer::Failed(format!(
                "leader at {addr} answered {status}: {}",
                text.trim()
            ));
        }
        let header = |name: &HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (Some(term), Some(generation)) = (header(&TERM_HEADER), header(&GENERATION_HEADER))
        else {
            return ShardAnswer::Failed(format!(
                "leader at {addr} sent a shard without term and generation"
            ));
        };
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let bytes = match read_capped(resp).await {
            Ok(bytes) => bytes,
            Err(e) => return ShardAnswer::Failed(format!("reading shard from {addr}: {e}")),
        };
        let received = bytes.len();
        // Checked before it replaces what is served: bad bytes never do.
        let checked = tokio::task::spawn_blocking(move || match gzip {
            true => crate::targets::Body::from_gzip(bytes),
            false => crate::targets::Body::from_json_checked(&bytes),
        })
        .await;
        match checked {
            Ok(Ok(body)) => ShardAnswer::Shard {
                term,
                generation,
                body,
                received,
            },
            Ok(Err(e)) => {
                ShardAnswer::Failed(format!("leader at {addr} sent an invalid shard: {e}"))
            }
            Err(e) => ShardAnswer::Failed(format!("checking the shard from {addr}: {e}")),
        }
    }

    /// The leader's assignment, for a stopping replica's handoff.
    pub async fn assignment(&self, addr: &str, timeout: Duration) -> Option<AssignmentDoc> {
        let resp = self
            .get(format!("http://{addr}{ASSIGNMENT_PATH}"), timeout)
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }
}

/// A peer's answer body, refused past [`MAX_PEER_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Bytes, String> {
    let too_large = || format!("answer larger than {MAX_PEER_BYTES} bytes");
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_PEER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_PEER_BYTES {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn target(i: usize) -> Target {
        let labels: BTreeMap<String, String> = [
            ("__meta_cloudmap_namespace_name".to_owned(), "ns".to_owned()),
            ("cluster".to_owned(), "c\"1\n".to_owned()),
        ]
        .into();
        Target::new(
            "ns",
            "svc",
            &format!("t{i}"),
            MetricsSource::App,
            &format!("10.0.0.{i}:3000"),
            labels,
        )
    }

    #[test]
    fn a_frame_reads_back_as_the_same_targets_and_records() {
        let t = target(1);
        let id = crate::sharding::target_id(&t);
        let frame = encode_frame([
            Record::Put {
                t: WireTarget::of(&t),
                slots: vec![0, 2],
            },
            Record::Move {
                id: Id(id),
                slots: vec![1],
            },
            Record::Gone { id: Id(id) },
        ]);
        let mut strings = Interner::default();
        let mut seen = Vec::new();
        decode_frame(&frame, |r| {
            seen.push(r);
            Ok(())
        })
        .expect("decodes");
        assert_eq!(seen.len(), 3);
        let Record::Put { t: wire, slots } = &seen[0] else {
            panic!("{:?}", seen[0]);
        };
        assert_eq!(wire.target_id(), id);
        let back = wire.target(&mut strings).expect("target");
        assert_eq!(back, t);
        assert_eq!(back.content_hash(), t.content_hash());
        assert_eq!(
            crate::targets::render([&back]),
            crate::targets::render([&t])
        );
        assert_eq!(slots, &vec![0, 2]);
        assert!(matches!(&seen[1], Record::Move { id: Id(i), .. } if *i == id));
        assert!(matches!(&seen[2], Record::Gone { id: Id(i) } if *i == id));
    }

    #[test]
    fn a_cut_or_garbled_answer_is_refused() {
        let frames = vec![
            Frame {
                generation: 4,
                bytes: encode_frame([Record::Gone {
                    id: Id(TargetId(7)),
                }]),
            },
            Frame {
                generation: 5,
                bytes: encode_frame([]),
            },
        ];
        let head = ChangesHead {
            term: 2,
            generation: 5,
            whole: false,
            slots: vec![],
            shards: vec![],
            frames: vec![],
        };
        let bytes = Bytes::from(encode_answer(head, &frames).concat());
        let (head, back) = decode_answer(&bytes).expect("decodes");
        assert_eq!((head.term, head.generation, back.len()), (2, 5, 2));
        assert!(decode_answer(&bytes.slice(..bytes.len() - 1)).is_err());
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(decode_answer(&Bytes::from(longer)).is_err());
        let mut garbled = bytes.to_vec();
        let last = garbled.len() - 3;
        garbled[last] ^= 0xff;
        assert!(matches!(
            decode_answer(&Bytes::from(garbled)),
            Err(ProtocolError::Garbled(5))
        ));
        assert!(decode_answer(&Bytes::from_static(b"no head")).is_err());
    }

    #[test]
    fn a_record_without_end_is_refused_once_past_the_limit() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![b' '; MAX_RECORD_BYTES + 10]).unwrap();
        let frame = gz.finish().unwrap();
        assert!(matches!(
            decode_frame(&frame, |_| Ok(())),
            Err(ProtocolError::RecordTooLong)
        ));
    }

    #[test]
    fn a_discovered_target_travels_as_its_instance_and_reads_back_the_same() {
        let tags: BTreeMap<String, String> = [
            ("METRICS_PATH".to_owned(), "/m".to_owned()),
            ("METRICS_PORT".to_owned(), "9100".to_owned()),
            ("METRICS_SCHEME".to_owned(), "https".to_owned()),
            ("ECS_METRICS_PATH".to_owned(), "/ecs".to_owned()),
            ("ECS_METRICS_PORT".to_owned(), "9779".to_owned()),
        ]
        .into();
        let mut strings = Interner::default();
        let instance = Arc::new(strings.instance(
            "task-1",
            [
                ("AWS_INSTANCE_IPV4", "10.1.2.3"),
                ("ECS_CLUSTER_NAME", "prod"),
                ("ECS_SERVICE_NAME", "web"),
                ("bad name!", "x"),
            ],
        ));
        let built = crate::targets::build_all([crate::targets::ServiceData {
            namespace: "ns",
            service: "web",
            tags: &tags,
            instances: std::slice::from_ref(&instance),
            rule: None,
            host_ports: None,
        }]);
        assert_eq!(built.targets.len(), 2, "{:?}", built.problems);
        for t in built.targets.iter() {
            let wire = WireTarget::of(t);
            assert!(wire.derived.is_some() && wire.labels.is_empty());
            let line = serde_json::to_vec(&wire).unwrap();
            let back: WireTarget = serde_json::from_slice(&line).unwrap();
            assert_eq!(back.target_id(), crate::sharding::target_id(t));
            let back = back.target(&mut Interner::default()).expect("target");
            assert_eq!(back, *t);
            assert_eq!(back.content_hash(), t.content_hash());
            assert_eq!(crate::targets::render([&back]), crate::targets::render([t]));
        }
        // A scheme nobody renders is refused, not guessed.
        let mut wire = WireTarget::of(&built.targets[0]);
        if let Some(d) = wire.derived.as_mut() {
            d.scheme = Some("gopher".into());
        }
        assert!(wire.target(&mut Interner::default()).is_err());
    }

    #[test]
    fn a_target_with_scrape_timing_travels_as_its_labels() {
        let tags: BTreeMap<String, String> = [
            ("METRICS_PATH", "/metrics"),
            ("METRICS_PORT", "3000"),
            ("METRICS_INTERVAL", "2s"),
            ("ECS_METRICS_PATH", "/ecs"),
            ("ECS_METRICS_PORT", "9779"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let instance =
            Arc::new(Interner::default().instance("task-1", [("AWS_INSTANCE_IPV4", "10.1.2.3")]));
        let built = crate::targets::build_all([crate::targets::ServiceData {
            namespace: "ns",
            service: "web",
            tags: &tags,
            instances: std::slice::from_ref(&instance),
            rule: None,
            host_ports: None,
        }]);
        let [app, exporter] = &built.targets[..] else {
            panic!("{built:?}")
        };
        for (t, derived) in [(app, false), (exporter, true)] {
            let wire = WireTarget::of(t);
            // A replica of the release before scrape timing would derive the
            // target without it: such a target goes as its rendered labels.
            assert_eq!(wire.derived.is_some(), derived);
            let back: WireTarget =
                serde_json::from_slice(&serde_json::to_vec(&wire).unwrap()).unwrap();
            assert_eq!(back.target_id(), crate::sharding::target_id(t));
            let back = back.target(&mut Interner::default()).expect("target");
            assert_eq!(back.content_hash(), t.content_hash());
            assert_eq!(crate::targets::render([&back]), crate::targets::render([t]));
        }
        assert_eq!(app.label("__scrape_interval__"), Some("2s"));
    }

    #[test]
    fn unsorted_labels_from_a_peer_are_refused() {
        let mut wire = WireTarget::of(&target(1));
        wire.labels.reverse();
        assert!(wire.target(&mut Interner::default()).is_err());
    }
}
