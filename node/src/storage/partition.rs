//! The state machine of one partition: deduplicated events in columnar chunks, and persons.
//!
//! Apply is deterministic and identical on every replica: a message id seen before is a
//! duplicate (decided here, inside the replicated state machine, so every replica agrees);
//! otherwise the event joins the partition's unsealed rows and its person is updated. Unsealed
//! rows are not written on apply: the Raft log already holds them durably and is replayed after
//! a crash. Sealing writes each chunk's body to a file of its own ([`chunk_files`]), then the
//! chunks' metadata, the changed persons and the applied marker in one atomic sled batch, so a
//! crash can never leave a chunk without its marker or the reverse.
//!
//! sled layout (tree `p{partition}.data`): `m/{project}{chunk}` chunk metadata,
//! `b/{project}{chunk}` the generation of its body's file, `p/{project}{person}` persons,
//! `marker` the applied marker. Versions before body files kept bodies under
//! `c/{project}{chunk}`; opening a partition moves them to files.

use crate::storage::chunk::{self, Chunk, ChunkBuilder, ChunkMeta, EventRow, StoredEventRef};
use crate::storage::chunk_files::{self, BodyFile, ChunkFiles};
use arrow::array::RecordBatch;
use optiprism_consensus::state_machine::{
    CoreError, DurableCut, DurableSnapshot, StateMachineCore,
};
use optiprism_types::event::PropValue;
use optiprism_types::ids::message_key;
use optiprism_types::{PartitionId, PersonId, ProjectId};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

/// A command of a partition group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PartitionCommand {
    /// Store events of a project.
    Ingest {
        /// The project.
        project: ProjectId,
        /// Identifies the proposal on the node that made it (see [`LocalProposals`]).
        token: u128,
        /// The events of each request, in order: `events` is their concatenation, and the
        /// response has one [`IngestOutcome`] per part.
        parts: Vec<u32>,
        /// The typed events, bincode, LZ4-compressed as [`compress_framed`] does.
        #[serde(with = "serde_bytes")]
        events: Vec<u8>,
    },
    /// Store events of a project, as the rows of a chunk: what proposals are made of. Every
    /// replica applies every entry; reading the events one by one (decoding each string, then
    /// appending it to the columns) was most of a replica's work, where appending a column
    /// whole is a copy and a dictionary merge. `Ingest` stays for entries already in logs.
    IngestRows {
        /// The project.
        project: ProjectId,
        /// Identifies the proposal on the node that made it (see [`LocalProposals`]).
        token: u128,
        /// The rows of each request, in order, as in `Ingest`.
        parts: Vec<u32>,
        /// A [`ChunkBuilder`] batch of the events, [`encode_rows`]-encoded (Arrow IPC,
        /// LZ4-compressed).
        #[serde(with = "serde_bytes")]
        rows: Vec<u8>,
        /// The person properties the events set, by row (most set none).
        person_sets: Vec<PersonSets>,
    },
}

/// The person properties one event sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersonSets {
    /// The event's row in its proposal.
    pub row: u32,
    /// Person properties to set.
    pub set: Vec<(String, PropValue)>,
    /// Person properties to set once.
    pub set_once: Vec<(String, PropValue)>,
}

/// A proposal's events as a command carries them: their rows and the person properties they
/// set.
#[derive(Debug, Clone)]
pub struct ProposedRows {
    /// The rows, a [`ChunkBuilder`] batch.
    pub batch: RecordBatch,
    /// The person properties the events set, by row.
    pub person_sets: Vec<PersonSets>,
}

impl ProposedRows {
    /// The rows of `events`, in order.
    pub fn of(events: &[impl EventRow]) -> ProposedRows {
        let mut builder = ChunkBuilder::with_expected_rows(events.len());
        let mut person_sets = Vec::new();
        for (row, e) in events.iter().enumerate() {
            builder.append(e);
            if !(e.person_set().is_empty() && e.person_set_once().is_empty()) {
                person_sets.push(PersonSets {
                    row: row as u32,
                    set: e.person_set().to_vec(),
                    set_once: e.person_set_once().to_vec(),
                });
            }
        }
        ProposedRows {
            batch: builder.finish(),
            person_sets,
        }
    }
}

/// Compresses `raw` with LZ4, its length first (what [`decompress_framed`] reads).
fn compress_framed(raw: &[u8]) -> Vec<u8> {
    thread_local! {
        // Reused across calls: a fresh buffer of this size per batch cost more in page faults
        // (the allocator hands back newly mapped, zeroed pages) than the compression itself.
        static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    OUT.with_borrow_mut(|out| {
        out.clear();
        out.resize(4 + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
        out[..4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        let len = lz4_flex::block::compress_into(raw, &mut out[4..])
            .expect("the output buffer has the maximum compressed size");
        let framed = out[..4 + len].to_vec();
        if out.capacity() > SCRATCH_KEEP_BYTES {
            *out = Vec::new();
        }
        framed
    })
}

/// Encodes a [`ChunkBuilder`] batch for a command: Arrow IPC compressed whole with LZ4 (the
/// IPC format's own compression works buffer by buffer, and a proposal's columns are small).
pub fn encode_rows(batch: &RecordBatch) -> Vec<u8> {
    thread_local! {
        static RAW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    RAW.with_borrow_mut(|raw| {
        raw.clear();
        {
            let mut writer =
                arrow_ipc::writer::StreamWriter::try_new(&mut *raw, batch.schema_ref())
                    .expect("a chunk schema encodes");
            writer.write(batch).expect("writing to memory");
            writer.finish().expect("writing to memory");
        }
        let out = compress_framed(raw);
        if raw.capacity() > SCRATCH_KEEP_BYTES {
            *raw = Vec::new();
        }
        out
    })
}

/// Decodes what [`encode_rows`] wrote, checked to be of [`ChunkBuilder`] layout.
fn decode_rows(bytes: &[u8], raw: &mut Vec<u8>) -> Result<RecordBatch, CoreError> {
    let raw = decompress_framed(bytes, raw)?;
    // Arrow's IPC decoder trusts the offsets inside a message and asserts on them. A malformed
    // entry must fail its command, not panic apply (on every replica, and on every replay).
    // The push decoder reads only the bytes given, so a claimed length past them is an error
    // rather than an allocation.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut buffer = arrow::buffer::Buffer::from(raw);
        let mut decoder = arrow_ipc::reader::StreamDecoder::new();
        let mut batches = Vec::new();
        while !buffer.is_empty() {
            match decoder.decode(&mut buffer)? {
                Some(batch) => batches.push(batch),
                None if buffer.is_empty() => break,
                None => {}
            }
        }
        decoder.finish()?;
        Ok::<_, arrow::error::ArrowError>(batches)
    }))
    .map_err(|_| "a command's rows are malformed Arrow IPC")??;
    let [batch] = <[RecordBatch; 1]>::try_from(decoded)
        .map_err(|b| format!("a command with {} batches of rows, not one", b.len()))?;
    chunk::BatchLayout::read(&batch)?;
    Ok(batch)
}

/// Encodes events for an `Ingest` command, as nodes did before proposals carried rows:
/// bincode, LZ4-compressed. Only tests write these now; apply still reads them.
#[cfg(test)]
pub fn encode_events(events: &[chunk::StoredEvent]) -> Vec<u8> {
    let mut raw = Vec::new();
    optiprism_consensus::encode_into(&events, &mut raw);
    compress_framed(&raw)
}

/// The largest scratch buffer kept between calls.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;

/// The largest decoded size a command's events may claim: a corrupt length must fail the
/// command, not allocate gigabytes (the transport refuses larger frames anyway).
const MAX_DECODED_EVENTS_BYTES: usize = 512 << 20;

/// Decompresses what [`compress_framed`] wrote (legacy events, or [`encode_rows`]) into `raw`. Replicas apply
/// every entry this way, so `raw` is a buffer kept between entries: a fresh allocation of each
/// entry's size cost more in page faults (the allocator returns freed large blocks to the
/// system, and each new one is zeroed again) than the decoding itself.
fn decompress_framed<'r>(bytes: &[u8], raw: &'r mut Vec<u8>) -> Result<&'r [u8], CoreError> {
    let (len, body) = claimed_decoded_size(bytes)?;
    raw.clear();
    raw.resize(len, 0);
    let written = lz4_flex::block::decompress_into(body, raw)?;
    if written != len {
        return Err(format!("a command's events decompress to {written} bytes, not {len}").into());
    }
    Ok(raw)
}

/// The decoded size that what [`compress_framed`] wrote claims, and its compressed body; fails
/// a command whose events claim more than [`MAX_DECODED_EVENTS_BYTES`].
fn claimed_decoded_size(bytes: &[u8]) -> Result<(usize, &[u8]), CoreError> {
    let (len, body) = lz4_flex::block::uncompressed_size(bytes)?;
    if len > MAX_DECODED_EVENTS_BYTES {
        return Err(format!("a command claims {len} bytes of events").into());
    }
    Ok((len, body))
}

/// Whether rows encoded by [`encode_rows`] fit one entry: every replica fails a command whose
/// rows decode to more than [`MAX_DECODED_EVENTS_BYTES`]. `Err` holds their decoded size and
/// the limit.
pub fn rows_fit_an_entry(encoded: &[u8]) -> Result<(), (usize, usize)> {
    match lz4_flex::block::uncompressed_size(encoded) {
        Ok((len, _)) if len <= MAX_DECODED_EVENTS_BYTES => Ok(()),
        Ok((len, _)) => Err((len, MAX_DECODED_EVENTS_BYTES)),
        Err(_) => Err((encoded.len(), MAX_DECODED_EVENTS_BYTES)),
    }
}

/// Decodes what `encode_events` wrote into owned events (apply borrows instead).
#[cfg(test)]
fn decode_events(bytes: &[u8]) -> Result<Vec<chunk::StoredEvent>, CoreError> {
    let mut raw = Vec::new();
    Ok(optiprism_consensus::decode(decompress_framed(
        bytes, &mut raw,
    )?)?)
}

/// [`PartitionCommand`] as apply reads it: the encoded events borrowed from the log entry
/// instead of copied out of it. It must stay field for field the same as the command.
#[derive(Deserialize)]
enum PartitionCommandRef<'a> {
    Ingest {
        project: ProjectId,
        _token: u128,
        parts: Vec<u32>,
        #[serde(borrow)]
        events: &'a [u8],
    },
    IngestRows {
        project: ProjectId,
        token: u128,
        parts: Vec<u32>,
        #[serde(borrow)]
        rows: &'a [u8],
        person_sets: Vec<PersonSets>,
    },
}

/// Rows this node proposed, keyed by the proposal's token: applying its own proposals, the
/// node takes them from here instead of decoding the log entry again. Replicas (and replay
/// after a restart) decode the entry; both give the same rows.
#[derive(Debug, Clone, Default)]
pub struct LocalProposals(Arc<Mutex<HashMap<u128, ProposedRows>>>);

impl LocalProposals {
    /// Registers the rows of a proposal about to be made.
    pub fn insert(&self, token: u128, rows: ProposedRows) {
        self.0.lock().insert(token, rows);
    }

    /// Takes them back (at apply, or when the proposal failed).
    pub fn take(&self, token: u128) -> Option<ProposedRows> {
        self.0.lock().remove(&token)
    }
}

/// The answer to [`PartitionCommand::IngestRows`] (and the legacy `Ingest`), per part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IngestOutcome {
    /// Events stored.
    pub accepted: u32,
    /// Events dropped as duplicates of an earlier message id.
    pub duplicates: u32,
}

/// A person's current state in this partition.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PersonRow {
    /// First time any event of the person was seen (epoch ms).
    pub created_at_ms: i64,
    /// Current properties.
    pub properties: BTreeMap<String, PropValue>,
    /// Distinct ids whose events landed here.
    pub distinct_ids: Vec<String>,
}

/// Message keys are already uniform hashes: fold them instead of hashing again.
#[derive(Debug, Default)]
pub struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = (v as u64) ^ ((v >> 64) as u64);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 ^= v;
    }
    fn write_u32(&mut self, v: u32) {
        // Project ids are small: spread them so they do not cancel the person's low bits.
        self.0 ^= u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type KeySet = HashSet<u128, BuildHasherDefault<FoldHasher>>;

/// The message keys a partition has stored, in shards of unequal shares.
///
/// One table grows by doubling, and a doubling rehashes every key into a fresh table in one
/// insert, with the partition's data locked, so apply and queries of the partition wait for
/// it. Measured alone on this project's machines, one took 10 ms at 458,752 keys, 58 ms at
/// 917,504 and 117 ms at 1,835,008, and a partition keeps every key it ever stored. Under even
/// load every partition of every member also doubles at about the same moment. Shards of
/// equal shares would not help: they fill at one rate and all double within a few percent of
/// the same count (so did the shards here at first, at 458,752 keys a partition, and the
/// members' acknowledgements slowed for seconds together). So shard `i` takes a share of the
/// keys proportional to `2^(i/256)`: the shards' doublings are spread evenly over every
/// doubling of the partition, a 256th of the work each.
#[derive(Debug)]
struct MessageKeys {
    shards: Box<[KeySet]>,
}

/// Shards of [`MessageKeys`].
const KEY_SHARDS: usize = 256;

/// Bits of a key that choose its shard: enough slots that shares differ by about as little as
/// the noise of filling them.
const KEY_SHARD_SLOT_BITS: u32 = 14;

/// The shard of each value of a key's top [`KEY_SHARD_SLOT_BITS`] bits: shard `i` gets a run
/// of slots in proportion to `2^(i/256)`.
static KEY_SHARD_OF_SLOT: std::sync::LazyLock<Box<[u8]>> = std::sync::LazyLock::new(|| {
    let slots = 1usize << KEY_SHARD_SLOT_BITS;
    let weights: Vec<f64> = (0..KEY_SHARDS)
        .map(|i| (i as f64 / KEY_SHARDS as f64).exp2())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut table = Vec::with_capacity(slots);
    let mut cumulative = 0.0;
    for (shard, weight) in weights.iter().enumerate() {
        cumulative += weight;
        let end = ((cumulative / total) * slots as f64).round() as usize;
        table.resize(end.clamp(table.len(), slots), shard as u8);
    }
    table.resize(slots, (KEY_SHARDS - 1) as u8);
    table.into_boxed_slice()
});

impl Default for MessageKeys {
    fn default() -> MessageKeys {
        MessageKeys {
            shards: (0..KEY_SHARDS).map(|_| KeySet::default()).collect(),
        }
    }
}

impl MessageKeys {
    /// Adds `key`; false when it was already there.
    fn insert(&mut self, key: u128) -> bool {
        self.shards[MessageKeys::shard_of(key)].insert(key)
    }

    /// The shard of `key`. Keys are uniform hashes: the top bits pick the shard, the rest the
    /// bucket.
    fn shard_of(key: u128) -> usize {
        let slot = (key >> (128 - KEY_SHARD_SLOT_BITS)) as usize;
        usize::from(KEY_SHARD_OF_SLOT[slot])
    }
}

type PersonKeySet = HashSet<(ProjectId, PersonId), BuildHasherDefault<FoldHasher>>;
/// Rows behind an `Arc`: a seal takes the changed ones as of its marker on the apply path, and
/// cloning thousands of rows there (their properties and distinct ids) held that partition's
/// apply up for 5-10 ms every seal; apply copies a row only when it changes one that a seal
/// still holds.
type PersonMap = HashMap<(ProjectId, PersonId), Arc<PersonRow>, BuildHasherDefault<FoldHasher>>;

#[derive(Debug, Default)]
struct Pending {
    /// Applied, unsealed rows.
    rows: ChunkBuilder,
    /// The Arrow batch of `rows`, rebuilt when queries find it stale.
    batch: Mutex<Option<(usize, RecordBatch)>>,
}

impl Pending {
    fn batch(&self) -> Option<RecordBatch> {
        if self.rows.is_empty() {
            return None;
        }
        let mut cached = self.batch.lock();
        match &*cached {
            Some((len, batch)) if *len == self.rows.len() => Some(batch.clone()),
            _ => {
                let batch = self.rows.snapshot();
                *cached = Some((self.rows.len(), batch.clone()));
                Some(batch)
            }
        }
    }
}

/// What queries read: sealed chunks and unsealed rows, per project.
#[derive(Debug, Default)]
pub struct PartitionData {
    chunks: BTreeMap<ProjectId, Vec<Arc<Chunk>>>,
    pending: BTreeMap<ProjectId, Pending>,
    /// Rows handed to the background sealer, by job, until their chunks are written.
    sealing: BTreeMap<u64, Vec<(ProjectId, RecordBatch)>>,
    persons: PersonMap,
    seen: MessageKeys,
}

/// A point-in-time view of a project's rows in one partition.
#[derive(Debug, Clone, Default)]
pub struct ProjectRows {
    /// Batches of sealed chunks and of unsealed rows (schemas differ: properties vary).
    pub batches: Vec<RecordBatch>,
    /// Rows in all batches.
    pub rows: usize,
}

impl PartitionData {
    /// The rows of `project` that may hold events in `[start_ms, end_ms)` named one of `events`
    /// (`None`: any event). Sealed chunks contribute zero-copy slices holding just those events.
    pub fn rows(
        &self,
        project: ProjectId,
        start_ms: i64,
        end_ms: i64,
        events: Option<&[String]>,
    ) -> ProjectRows {
        let mut out = ProjectRows::default();
        let mut push = |batch: RecordBatch| {
            out.rows += batch.num_rows();
            out.batches.push(batch);
        };
        if let Some(chunks) = self.chunks.get(&project) {
            for c in chunks.iter().filter(|c| c.meta.overlaps(start_ms, end_ms)) {
                match events {
                    None => push(c.batch.clone()),
                    Some(names) => {
                        for (offset, len) in names.iter().filter_map(|n| c.meta.rows_of(n)) {
                            push(c.batch.slice(offset, len));
                        }
                    }
                }
            }
        }
        for rows in self.sealing.values() {
            for (_, batch) in rows.iter().filter(|(p, _)| *p == project) {
                push(batch.clone());
            }
        }
        if let Some(batch) = self.pending.get(&project).and_then(Pending::batch) {
            push(batch);
        }
        out
    }

    /// Persons of `project` in this partition.
    pub fn persons(&self, project: ProjectId) -> Vec<(PersonId, PersonRow)> {
        self.persons
            .iter()
            .filter(|((p, _), _)| *p == project)
            .map(|((_, id), row)| (*id, PersonRow::clone(row)))
            .collect()
    }
}

/// A partition's snapshot as this node keeps it: the chunks it names, and the persons.
#[derive(Debug, Serialize, Deserialize)]
struct PartitionSnapshot {
    chunks: Vec<ChunkMeta>,
    persons: Vec<(ProjectId, PersonId, PersonRow)>,
}

/// A partition's snapshot as a follower receives it: the chunks' bodies travel along, since
/// chunk boundaries and ids are each replica's own (every replica seals on its own schedule).
#[derive(Debug, Serialize, Deserialize)]
struct ShippedSnapshot {
    chunks: Vec<(ChunkMeta, serde_bytes::ByteBuf)>,
    persons: Vec<(ProjectId, PersonId, PersonRow)>,
}

/// Where a node keeps partition data beside its sled trees.
#[derive(Debug, Clone)]
pub struct DataPaths {
    /// The directory of chunk bodies (`{data-dir}/chunks`).
    pub chunks: PathBuf,
    /// sled's log file. sled's own flush ends in `sync_file_range`, which does not flush the
    /// disk's cache, so a batch that stops naming chunk files is made durable with an `fsync`
    /// of this file before those files are deleted: deletions reaching the disk first would
    /// leave, after a power loss, sled naming files that are gone.
    pub sled_log: PathBuf,
}

/// The state machine core of a partition.
#[derive(Debug)]
pub struct PartitionCore {
    partition: PartitionId,
    tree: sled::Tree,
    files: ChunkFiles,
    paths: DataPaths,
    data: Arc<RwLock<PartitionData>>,
    dirty_persons: PersonKeySet,
    next_chunk: u64,
    unsealed: usize,
    seal_rows: usize,
    marker: Option<Vec<u8>>,
    local: LocalProposals,
    /// The decompressed events of the entry being applied, kept between entries for its
    /// allocation.
    raw: Vec<u8>,
    sealer: Sealer,
    next_job: u64,
}

/// A seal handed to the background sealer: finished (unsorted) rows per project with their
/// chunk ids, the changed persons as of the marker, and the marker.
struct SealJob {
    id: u64,
    rows: Vec<(ProjectId, u64, RecordBatch)>,
    persons: Vec<((ProjectId, PersonId), Arc<PersonRow>)>,
    marker: Vec<u8>,
}

enum SealerMessage {
    Seal(Box<SealTask>),
    /// Answered once every job sent before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// A job with what writing it needs: the partition's tree, files, data and sealer state.
struct SealTask {
    partition: PartitionId,
    tree: sled::Tree,
    files: ChunkFiles,
    data: Arc<RwLock<PartitionData>>,
    failure: Arc<Mutex<Option<String>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<Mutex<()>>,
    job: SealJob,
}

impl SealTask {
    fn write(&self) -> Result<(), CoreError> {
        write_sealed(
            self.partition,
            &self.tree,
            &self.files,
            &self.data,
            &self.cut,
            &self.job,
        )
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Which partition core the task is of: its failure flag is the core's own. Not the
    /// partition id, which a replica that moved away and back (or a test) has twice.
    fn core(&self) -> usize {
        Arc::as_ptr(&self.failure) as usize
    }
}

/// The wait before the first retry of a failed seal; it doubles after each failed retry up to
/// [`SEAL_RETRY_LONGEST`]. A disk that filled up is usually freed by an operator within
/// minutes, and a retry is cheap (it writes the same chunks under fresh file names), so the
/// partition resumes sealing soon after without a restart.
pub(crate) const SEAL_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest wait between retries of a failed seal.
pub(crate) const SEAL_RETRY_LONGEST: std::time::Duration = std::time::Duration::from_secs(30);

/// A partition core's jobs not yet written, in order: the failed one first, then the ones
/// queued behind it, and when to try again.
struct HeldSeals {
    tasks: std::collections::VecDeque<SealTask>,
    retry_at: std::time::Instant,
    /// The wait before `retry_at`; zero until a write has failed.
    wait: std::time::Duration,
}

/// The sealing thread's state: the partitions whose seals wait for a retry, by
/// [`SealTask::core`].
#[derive(Default)]
struct SealerThread {
    held: HashMap<usize, HeldSeals>,
}

impl SealerThread {
    fn run(mut self, queue: std::sync::mpsc::Receiver<SealerMessage>) {
        loop {
            let message = match self.held.values().map(|h| h.retry_at).min() {
                None => match queue.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return,
                },
                Some(at) => {
                    let wait = at.saturating_duration_since(std::time::Instant::now());
                    match queue.recv_timeout(wait) {
                        Ok(m) => Some(m),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            };
            match message {
                Some(SealerMessage::Seal(task)) => self.seal(*task),
                Some(SealerMessage::Barrier(done)) => {
                    let _ = done.send(());
                }
                None => {}
            }
            // Here rather than only on a timeout: other partitions' seals arriving more often
            // than the wait would otherwise put a retry off for ever.
            self.retry_due();
        }
    }

    /// Writes `task`, or holds it behind an earlier failed job of its partition (markers only
    /// move forward, so jobs are written in order).
    fn seal(&mut self, task: SealTask) {
        let core = task.core();
        if task.is_closed() {
            self.held.remove(&core);
            return;
        }
        match self.held.get_mut(&core) {
            Some(held) => held.tasks.push_back(task),
            None => self.write_in_order(
                core,
                HeldSeals {
                    tasks: [task].into(),
                    retry_at: std::time::Instant::now(),
                    wait: std::time::Duration::ZERO,
                },
            ),
        }
    }

    /// Retries the held jobs of every partition whose retry is due.
    fn retry_due(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<usize> = self
            .held
            .iter()
            .filter(|(_, h)| h.retry_at <= now)
            .map(|(core, _)| *core)
            .collect();
        for core in due {
            if let Some(held) = self.held.remove(&core) {
                self.write_in_order(core, held);
            }
        }
    }

    /// Writes `held`'s jobs in order until one fails, which is then held with the rest for a
    /// retry after a doubled wait (the first after [`SEAL_RETRY_FIRST`]). A closed core's jobs
    /// are dropped. Once a held partition's jobs are all written, its failure clears.
    fn write_in_order(&mut self, core: usize, mut held: HeldSeals) {
        // Every job of one core shares its failure and closed flags.
        let Some(first) = held.tasks.front() else {
            return;
        };
        let (partition, failure, closed) = (
            first.partition,
            Arc::clone(&first.failure),
            Arc::clone(&first.closed),
        );
        while let Some(task) = held.tasks.front() {
            if task.is_closed() {
                return;
            }
            if let Err(e) = task.write() {
                if held.wait.is_zero() {
                    held.wait = SEAL_RETRY_FIRST;
                    tracing::error!(partition_id = %partition, error = %e, retry_in_s = held.wait.as_secs(), "sealing failed; the rows stay in memory and in the Raft log until a retry writes them");
                } else {
                    held.wait = (held.wait * 2).min(SEAL_RETRY_LONGEST);
                    tracing::warn!(partition_id = %partition, error = %e, retry_in_s = held.wait.as_secs(), "retrying a seal failed");
                }
                held.retry_at = std::time::Instant::now() + held.wait;
                *failure.lock() = Some(e.to_string());
                self.held.insert(core, held);
                return;
            }
            held.tasks.pop_front();
        }
        if held.wait.is_zero() {
            return;
        }
        // Every held job is written: the partition seals (and snapshots) again. `close` sets
        // the failure under the same lock, so a closed partition keeps its.
        let mut failure = failure.lock();
        if !closed.load(std::sync::atomic::Ordering::SeqCst) {
            *failure = None;
            tracing::info!(partition_id = %partition, "a retried seal was written; sealing resumes");
        }
    }
}

/// The process's sealing thread: sorts and encodes rows into chunks and writes them with their
/// persons and marker, off the apply path (apply only hands the rows over). One thread for
/// every partition, as the periodic sealer did it inline before: seals of many partitions at
/// once would take both cores from Raft. Jobs run in order, so a partition's markers only move
/// forward. A failed write holds that partition's sealing: its rows stay visible to queries
/// and in the Raft log, its next synchronous persist fails, so no snapshot (and no log purge)
/// can pass them, and the thread retries the failed job and the ones behind it, in order,
/// after [`SEAL_RETRY_FIRST`], then at doubling intervals, until they are written.
#[derive(Debug)]
struct Sealer {
    partition: PartitionId,
    failure: Arc<Mutex<Option<String>>>,
    /// Set by [`PartitionCore::close`], which stops sealing through `failure` without a fault.
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Held while a write changes the durable state, so a snapshot read from it sees one cut.
    cut: Arc<Mutex<()>>,
}

/// Whether a partition's sealing failed, read without its state machine's lock (health checks
/// ask it on every request). While a failed seal waits for its retry, the partition's rows
/// stay in memory and in the Raft log, which no snapshot can purge, so both grow with every
/// event; the error clears once a retry has written every held job.
#[derive(Debug, Clone)]
pub struct SealFailure {
    failure: Arc<Mutex<Option<String>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl SealFailure {
    /// The error of the seal that failed, if one did (a partition closed to be dropped has
    /// not failed).
    pub fn error(&self) -> Option<String> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        self.failure.lock().clone()
    }
}

fn sealer_queue() -> &'static std::sync::mpsc::Sender<SealerMessage> {
    static QUEUE: std::sync::OnceLock<std::sync::mpsc::Sender<SealerMessage>> =
        std::sync::OnceLock::new();
    QUEUE.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<SealerMessage>();
        std::thread::Builder::new()
            .name("sealer".into())
            .spawn(move || {
                super::run_as_background_thread();
                SealerThread::default().run(queue);
            })
            .expect("spawning the sealer thread");
        jobs
    })
}

impl Sealer {
    fn new(partition: PartitionId) -> Sealer {
        Sealer {
            partition,
            failure: Arc::new(Mutex::new(None)),
            closed: Arc::default(),
            cut: Arc::default(),
        }
    }

    fn submit(
        &self,
        tree: &sled::Tree,
        files: &ChunkFiles,
        data: &Arc<RwLock<PartitionData>>,
        job: SealJob,
    ) {
        // The thread runs for the life of the process: a send cannot fail.
        let _ = sealer_queue().send(SealerMessage::Seal(Box::new(SealTask {
            partition: self.partition,
            tree: tree.clone(),
            files: files.clone(),
            data: Arc::clone(data),
            failure: Arc::clone(&self.failure),
            closed: Arc::clone(&self.closed),
            cut: Arc::clone(&self.cut),
            job,
        })));
    }

    /// Waits until every job submitted so far is written; fails if one of this partition's
    /// could not be.
    fn wait_idle(&self) -> Result<(), CoreError> {
        wait_for_queued_seals();
        match &*self.failure.lock() {
            None => Ok(()),
            Some(e) => Err(format!("an earlier seal failed: {e}").into()),
        }
    }
}

/// Blocks until every seal queued so far, of any partition, is written or has failed.
fn wait_for_queued_seals() {
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    if sealer_queue().send(SealerMessage::Barrier(done)).is_ok() {
        let _ = wait.recv();
    }
}

fn write_sealed(
    partition: PartitionId,
    tree: &sled::Tree,
    files: &ChunkFiles,
    data: &RwLock<PartitionData>,
    cut: &Mutex<()>,
    job: &SealJob,
) -> Result<(), CoreError> {
    let started = std::time::Instant::now();
    let mut batch = sled::Batch::default();
    let mut sealed = Vec::with_capacity(job.rows.len());
    let mut written = Vec::with_capacity(job.rows.len());
    let bodies = (|| {
        for (project, id, rows) in &job.rows {
            let (meta, bytes, arrow_batch) = chunk::seal(*project, *id, rows);
            // The body is a file of its own, written ahead of the batch that makes it part of
            // the partition; a crash in between leaves a file nothing names, deleted on the
            // next open.
            let file = files.write(meta.project, meta.id, &bytes)?;
            written.push(file);
            name_chunk(&mut batch, &meta, file);
            sealed.push(Arc::new(Chunk {
                meta,
                batch: arrow_batch,
            }));
        }
        if !sealed.is_empty() {
            files.sync_dir()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = bodies {
        // Nothing names these files yet, and a retry writes the chunks under new ones: without
        // this, every failed retry on a disk that is full would leave its files until the next
        // open. Best effort: the next open deletes what is left.
        for file in written {
            let _ = files.remove(file);
        }
        return Err(e.into());
    }
    for ((project, person), row) in &job.persons {
        batch.insert(
            person_key(*project, *person),
            optiprism_consensus::encode(&**row),
        );
    }
    batch.insert("marker", job.marker.as_slice());
    {
        let _cut = cut.lock();
        tree.apply_batch(batch)?;
    }
    let rows: u64 = sealed.iter().map(|c| c.meta.rows).sum();
    let mut data = data.write();
    data.sealing.remove(&job.id);
    for c in sealed {
        data.chunks.entry(c.meta.project).or_default().push(c);
    }
    tracing::debug!(partition_id = %partition, rows, ms = started.elapsed().as_secs_f64() * 1e3, "sealed");
    Ok(())
}

/// The sled tree of a partition's chunks, persons and marker.
fn data_tree(partition: PartitionId) -> String {
    format!("p{}.data", partition.0)
}

/// Deletes what `db` and the chunk directory hold of a partition's data, once its core is
/// closed ([`PartitionCore::close`]): a replica moved away. Blocks until the seals queued
/// before are written, so none lands in the directory after it went. The tree goes first,
/// durably: a crash in between leaves files that nothing names, which opening the partition
/// again would delete.
pub fn drop_partition_storage(
    db: &sled::Db,
    paths: &DataPaths,
    partition: PartitionId,
) -> Result<(), CoreError> {
    wait_for_queued_seals();
    db.drop_tree(data_tree(partition))?;
    optiprism_consensus::log_store::sync_sled(db, &paths.sled_log)?;
    chunk_files::remove_partition(&paths.chunks, partition)?;
    Ok(())
}

/// Every person row stored in `tree`.
fn stored_persons(tree: &sled::Tree) -> Result<Vec<(ProjectId, PersonId, PersonRow)>, CoreError> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(b"p/") {
        let (key, value) = item?;
        let (project, person) = split_key(&key)?;
        out.push((
            project,
            PersonId(person),
            optiprism_consensus::decode(&value)?,
        ));
    }
    Ok(out)
}

/// The durable state of a partition as a snapshot description, with its marker: what the last
/// completed seal wrote (read under `cut`, so no write lands halfway through).
fn durable_snapshot(
    tree: &sled::Tree,
    cut: &Mutex<()>,
    failure: &Mutex<Option<String>>,
) -> Result<Option<DurableCut>, CoreError> {
    if let Some(e) = &*failure.lock() {
        return Err(format!("an earlier seal failed: {e}").into());
    }
    let _cut = cut.lock();
    let Some(marker) = tree.get("marker")?.map(|v| v.to_vec()) else {
        return Ok(None);
    };
    let mut chunks = Vec::new();
    for item in tree.scan_prefix(b"m/") {
        chunks.push(optiprism_consensus::decode::<ChunkMeta>(&item?.1)?);
    }
    let snapshot = PartitionSnapshot {
        chunks,
        persons: stored_persons(tree)?,
    };
    Ok(Some((marker, optiprism_consensus::encode(&snapshot))))
}

fn chunk_key(prefix: u8, project: ProjectId, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(14);
    k.extend_from_slice(&[prefix, b'/']);
    k.extend_from_slice(&project.0.to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The project and id (of a chunk or person) in a key [`chunk_key`] made.
fn split_key(key: &[u8]) -> Result<(ProjectId, u64), CoreError> {
    let project = key.get(2..6).ok_or("a key too short")?;
    let id = key.get(6..14).ok_or("a key too short")?;
    Ok((
        ProjectId(u32::from_be_bytes(project.try_into()?)),
        u64::from_be_bytes(id.try_into()?),
    ))
}

fn person_key(project: ProjectId, person: PersonId) -> Vec<u8> {
    chunk_key(b'p', project, person.0)
}

/// Adds a chunk's metadata and the file of its body to `batch`.
fn name_chunk(batch: &mut sled::Batch, meta: &ChunkMeta, file: BodyFile) {
    batch.insert(
        chunk_key(b'm', meta.project, meta.id),
        optiprism_consensus::encode(meta),
    );
    batch.insert(
        chunk_key(b'b', meta.project, meta.id),
        &file.generation.to_be_bytes()[..],
    );
}

/// The file that holds the body of `meta`'s chunk, as `tree` names it.
fn body_file(tree: &sled::Tree, meta: &ChunkMeta) -> Result<Option<BodyFile>, CoreError> {
    tree.get(chunk_key(b'b', meta.project, meta.id))?
        .map(|generation| stored_body_file(meta.project, meta.id, &generation))
        .transpose()
}

/// The file a `b/` entry names: the chunk of its key, the generation its value holds.
fn stored_body_file(
    project: ProjectId,
    chunk: u64,
    generation: &[u8],
) -> Result<BodyFile, CoreError> {
    Ok(BodyFile {
        project,
        chunk,
        generation: u64::from_be_bytes(generation.try_into()?),
    })
}

impl PartitionCore {
    /// Opens the partition's tree and its chunk directory, and loads its chunks and persons
    /// into memory. Bodies that a crash left unnamed are deleted, and bodies an older version
    /// kept in sled are moved to files.
    pub fn open(
        db: &sled::Db,
        paths: &DataPaths,
        partition: PartitionId,
        seal_rows: usize,
    ) -> Result<PartitionCore, CoreError> {
        let tree = db.open_tree(data_tree(partition))?;
        let files = ChunkFiles::open(&paths.chunks, partition)?;
        let mut data = PartitionData::default();
        let mut next_chunk = 0;
        let mut named = HashSet::new();
        let mut moved_to_files = sled::Batch::default();
        let mut moved = 0;
        for item in tree.scan_prefix(b"m/") {
            let meta: ChunkMeta = optiprism_consensus::decode(&item?.1)?;
            let body = match body_file(&tree, &meta)? {
                Some(file) => {
                    named.insert(file);
                    files.read(file)?
                }
                None => {
                    let body = tree
                        .get(chunk_key(b'c', meta.project, meta.id))?
                        .ok_or_else(|| {
                            format!(
                                "partition {partition}: the body of chunk {} of project {} is missing",
                                meta.id, meta.project
                            )
                        })?;
                    let file = files.write(meta.project, meta.id, &body)?;
                    named.insert(file);
                    name_chunk(&mut moved_to_files, &meta, file);
                    moved += 1;
                    body.to_vec()
                }
            };
            let batch = chunk::decode(&body)?;
            next_chunk = next_chunk.max(meta.id + 1);
            add_seen(&mut data.seen, meta.project, &batch);
            data.chunks
                .entry(meta.project)
                .or_default()
                .push(Arc::new(Chunk { meta, batch }));
        }
        // Bodies in sled: moved to files above, or left by a crash before their metadata.
        for item in tree.scan_prefix(b"c/") {
            moved_to_files.remove(item?.0);
        }
        if moved > 0 {
            files.sync_dir()?;
        }
        tree.apply_batch(moved_to_files)?;
        if moved > 0 {
            tracing::info!(partition_id = %partition, chunks = moved, "moved chunk bodies from sled to files");
        }
        let unnamed = files.remove_all_but(&named)?;
        if unnamed > 0 {
            tracing::info!(partition_id = %partition, files = unnamed, "deleted chunk bodies no chunk names (left by a crash)");
        }
        for (project, person, row) in stored_persons(&tree)? {
            data.persons.insert((project, person), Arc::new(row));
        }
        let marker = tree.get("marker")?.map(|v| v.to_vec());
        let data = Arc::new(RwLock::new(data));
        Ok(PartitionCore {
            partition,
            sealer: Sealer::new(partition),
            next_job: 0,
            tree,
            files,
            paths: paths.clone(),
            data,
            dirty_persons: PersonKeySet::default(),
            next_chunk,
            unsealed: 0,
            seal_rows,
            marker,
            local: LocalProposals::default(),
            raw: Vec::new(),
        })
    }

    /// Stops sealing: seals asked for from now on are skipped. For a replica about to be
    /// dropped (the periodic sealer may still ask, from a list of partitions taken before).
    pub fn close(&self) {
        self.sealer
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        *self.sealer.failure.lock() = Some(format!("partition {} was closed", self.partition));
    }

    /// Tells whether sealing has failed; see [`SealFailure`].
    pub fn seal_failure(&self) -> SealFailure {
        SealFailure {
            failure: Arc::clone(&self.sealer.failure),
            closed: Arc::clone(&self.sealer.closed),
        }
    }

    /// The data queries read.
    pub fn data(&self) -> Arc<RwLock<PartitionData>> {
        Arc::clone(&self.data)
    }

    /// Decoded events of this node's own proposals.
    pub fn local_proposals(&self) -> LocalProposals {
        self.local.clone()
    }

    /// Applies an ingest command: the events of each part, deduplicated, become unsealed rows
    /// and update their persons. Fails (changing nothing) when the command cannot be read.
    fn apply_ingest(&mut self, command: &[u8]) -> Result<Vec<IngestOutcome>, CoreError> {
        let mut raw = std::mem::take(&mut self.raw);
        let outcomes = match optiprism_consensus::decode_borrowed(command)? {
            PartitionCommandRef::IngestRows {
                project,
                token,
                parts,
                rows,
                person_sets,
            } => match self.local.take(token) {
                Some(local) => {
                    // The proposer applies its own rows without decoding them, but it must
                    // fail the command exactly where the other replicas' decoding would.
                    claimed_decoded_size(rows)?;
                    self.ingest_rows(project, &parts, &local.batch, &local.person_sets)?
                }
                None => {
                    let batch = decode_rows(rows, &mut raw)?;
                    self.ingest_rows(project, &parts, &batch, &person_sets)?
                }
            },
            PartitionCommandRef::Ingest {
                project,
                parts,
                events,
                ..
            } => {
                let decoded: Vec<StoredEventRef<'_>> =
                    optiprism_consensus::decode_borrowed(decompress_framed(events, &mut raw)?)?;
                // Applied as the rows they would be proposed as today: one apply for both.
                let rows = ProposedRows::of(&decoded);
                self.ingest_rows(project, &parts, &rows.batch, &rows.person_sets)?
            }
        };
        // Keep the buffer from pinning the memory of one unusually large entry.
        if raw.capacity() <= SCRATCH_KEEP_BYTES {
            self.raw = raw;
        }
        Ok(outcomes)
    }

    /// Ingests the rows of each part in turn, one outcome per part: a row whose message id was
    /// seen before is a duplicate and dropped; the others update their persons and join the
    /// unsealed rows.
    fn ingest_rows(
        &mut self,
        project: ProjectId,
        parts: &[u32],
        batch: &RecordBatch,
        person_sets: &[PersonSets],
    ) -> Result<Vec<IngestOutcome>, CoreError> {
        let layout = chunk::BatchLayout::read(batch)?;
        let rows = batch.num_rows();
        let total: u64 = parts.iter().map(|&n| u64::from(n)).sum();
        if total != rows as u64 {
            return Err(format!("parts name {total} events, the command holds {rows}").into());
        }
        if person_sets.iter().any(|s| s.row as usize >= rows)
            || person_sets.windows(2).any(|w| w[0].row >= w[1].row)
        {
            return Err("person properties name rows out of order or out of range".into());
        }
        let mut keep = Vec::with_capacity(rows);
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut sets = person_sets.iter().peekable();
        let mut data = self.data.write();
        let data = &mut *data;
        let mut row = 0;
        for &n in parts {
            let mut outcome = IngestOutcome::default();
            for _ in 0..n {
                let sets_here = sets.next_if(|s| s.row as usize == row);
                if !data
                    .seen
                    .insert(message_key(project, layout.uuid.value(row)))
                {
                    outcome.duplicates += 1;
                    keep.push(false);
                    row += 1;
                    continue;
                }
                let (person_id, timestamp_ms) =
                    (layout.person.value(row), layout.timestamp.value(row));
                let key = (project, PersonId(person_id));
                let person = Arc::make_mut(data.persons.entry(key).or_insert_with(|| {
                    Arc::new(PersonRow {
                        created_at_ms: timestamp_ms,
                        ..PersonRow::default()
                    })
                }));
                person.created_at_ms = person.created_at_ms.min(timestamp_ms);
                let distinct_id = arrow::array::ArrayAccessor::value(&layout.distinct, row);
                if !person.distinct_ids.iter().any(|d| d == distinct_id) {
                    person.distinct_ids.push(distinct_id.to_string());
                }
                if let Some(sets) = sets_here {
                    update_person(person, &sets.set, &sets.set_once);
                }
                self.dirty_persons.insert(key);
                keep.push(true);
                outcome.accepted += 1;
                row += 1;
            }
            outcomes.push(outcome);
        }
        let pending = &mut data.pending.entry(project).or_default().rows;
        let appended = if keep.iter().all(|&k| k) {
            pending.append_batch(batch)
        } else {
            let kept =
                arrow::compute::filter_record_batch(batch, &arrow::array::BooleanArray::from(keep))
                    .expect("a mask as long as the batch");
            pending.append_batch(&kept)
        };
        // The batch was checked above, so only a column outgrowing Arrow's 32-bit offsets could
        // fail here, and then its persons are already updated: stop rather than go on with the
        // two apart.
        appended.expect("appending checked rows");
        self.unsealed += outcomes.iter().map(|o| o.accepted as usize).sum::<usize>();
        Ok(outcomes)
    }

    /// Hands unsealed rows and changed persons to the background sealer with `marker`; they
    /// stay visible to queries meanwhile.
    fn seal_soon(&mut self, marker: &[u8]) {
        let started = std::time::Instant::now();
        let mut data = self.data.write();
        let id = self.next_job;
        self.next_job += 1;
        let mut rows = Vec::new();
        let mut visible = Vec::new();
        for (project, mut pending) in std::mem::take(&mut data.pending) {
            if pending.rows.is_empty() {
                continue;
            }
            let batch = pending.rows.finish();
            visible.push((project, batch.clone()));
            rows.push((project, self.next_chunk, batch));
            self.next_chunk += 1;
        }
        let persons: Vec<_> = self
            .dirty_persons
            .drain()
            .filter_map(|key| data.persons.get(&key).map(|row| (key, Arc::clone(row))))
            .collect();
        if !visible.is_empty() {
            data.sealing.insert(id, visible);
        }
        drop(data);
        tracing::debug!(partition_id = %self.partition, persons = persons.len(), ms = started.elapsed().as_secs_f64() * 1e3, "handed rows to the sealer");
        self.unsealed = 0;
        let job = SealJob {
            id,
            rows,
            persons,
            marker: marker.to_vec(),
        };
        self.sealer.submit(&self.tree, &self.files, &self.data, job);
    }

    /// Seals unsealed rows and changed persons together with `marker`, after everything handed
    /// to the background sealer before, and waits until it is written.
    fn seal(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        self.seal_soon(marker);
        self.sealer.wait_idle()?;
        self.marker = Some(marker.to_vec());
        Ok(())
    }
}

/// Sets a person's properties as an event asks.
fn update_person(
    person: &mut PersonRow,
    set: &[(String, PropValue)],
    set_once: &[(String, PropValue)],
) {
    for (k, v) in set {
        person.properties.insert(k.clone(), v.clone());
    }
    for (k, v) in set_once {
        person
            .properties
            .entry(k.clone())
            .or_insert_with(|| v.clone());
    }
}

fn add_seen(seen: &mut MessageKeys, project: ProjectId, batch: &RecordBatch) {
    use arrow::array::AsArray;
    if let Some(col) = batch.column_by_name("uuid") {
        for id in col.as_string::<i32>().iter().flatten() {
            seen.insert(message_key(project, id));
        }
    }
}

impl StateMachineCore for PartitionCore {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        let outcomes = self.apply_ingest(command).unwrap_or_else(|e| {
            // A command this version cannot read changes nothing, on every replica alike.
            tracing::error!(partition_id = %self.partition, error = %e, "undecodable partition command skipped");
            Vec::new()
        });
        optiprism_consensus::encode(&outcomes)
    }

    fn persisted_marker(&self) -> Option<Vec<u8>> {
        self.marker.clone()
    }

    fn wants_persist(&self) -> bool {
        self.unsealed >= self.seal_rows
    }

    fn persist(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        self.seal(marker)
    }

    fn persist_soon(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        self.seal_soon(marker);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, CoreError> {
        // Chunks are immutable and stay in this node's sled: the snapshot names them, and
        // `ship` adds their bodies only when a follower needs the snapshot.
        let data = self.data.read();
        let snapshot = PartitionSnapshot {
            chunks: data
                .chunks
                .values()
                .flatten()
                .map(|c| c.meta.clone())
                .collect(),
            persons: data
                .persons
                .iter()
                .map(|((p, id), row)| (*p, *id, PersonRow::clone(row)))
                .collect(),
        };
        Ok(optiprism_consensus::encode(&snapshot))
    }

    fn durable_snapshot(&self) -> Option<DurableSnapshot> {
        let tree = self.tree.clone();
        let cut = Arc::clone(&self.sealer.cut);
        let failure = Arc::clone(&self.sealer.failure);
        Some(Box::new(move || durable_snapshot(&tree, &cut, &failure)))
    }

    fn ship(&self, description: &[u8]) -> Result<Vec<u8>, CoreError> {
        let snapshot: PartitionSnapshot = optiprism_consensus::decode(description)?;
        let mut chunks = Vec::with_capacity(snapshot.chunks.len());
        for meta in snapshot.chunks {
            // Chunks are immutable, but an installed snapshot replaces them, possibly with other
            // chunks of the same ids: a description from before that is stale, not shippable.
            let stored = self.tree.get(chunk_key(b'm', meta.project, meta.id))?;
            let file = match stored {
                Some(m) if *m == *optiprism_consensus::encode(&meta) => {
                    body_file(&self.tree, &meta)?
                }
                _ => None,
            }
            .ok_or_else(|| {
                format!(
                    "snapshot of partition {} names chunk {} of project {} that this node does not hold",
                    self.partition, meta.id, meta.project
                )
            })?;
            chunks.push((meta, serde_bytes::ByteBuf::from(self.files.read(file)?)));
        }
        Ok(optiprism_consensus::encode(&ShippedSnapshot {
            chunks,
            persons: snapshot.persons,
        }))
    }

    fn install(&mut self, shipped: &[u8], marker: &[u8]) -> Result<(), CoreError> {
        // Seals still running describe the state being replaced: let them finish first.
        self.sealer.wait_idle()?;
        let snapshot: ShippedSnapshot = optiprism_consensus::decode(shipped)?;
        let mut fresh = PartitionData::default();
        let mut batch = sled::Batch::default();
        // The snapshot replaces everything: this replica's own chunks (sealed on its own
        // schedule, so with other boundaries and ids) and persons go. Their files go once no
        // durable state names them.
        let mut replaced = Vec::new();
        for prefix in [&b"c/"[..], b"m/", b"b/", b"p/"] {
            for item in self.tree.scan_prefix(prefix) {
                let (key, value) = item?;
                if prefix == b"b/" {
                    let (project, chunk) = split_key(&key)?;
                    replaced.push(stored_body_file(project, chunk, &value)?);
                }
                batch.remove(key);
            }
        }
        let mut next_chunk = 0;
        for (meta, body) in snapshot.chunks {
            let decoded = chunk::decode(&body)?;
            add_seen(&mut fresh.seen, meta.project, &decoded);
            next_chunk = next_chunk.max(meta.id + 1);
            let file = self.files.write(meta.project, meta.id, &body)?;
            name_chunk(&mut batch, &meta, file);
            fresh
                .chunks
                .entry(meta.project)
                .or_default()
                .push(Arc::new(Chunk {
                    meta,
                    batch: decoded,
                }));
        }
        for (project, person, row) in snapshot.persons {
            batch.insert(
                person_key(project, person),
                optiprism_consensus::encode(&row),
            );
            fresh.persons.insert((project, person), Arc::new(row));
        }
        self.files.sync_dir()?;
        batch.insert("marker", marker);
        {
            let _cut = self.sealer.cut.lock();
            self.tree.apply_batch(batch)?;
        }
        optiprism_consensus::log_store::sync_sled(&self.tree, &self.paths.sled_log)?;
        for file in replaced {
            if let Err(e) = self.files.remove(file) {
                // Unnamed now: the next open deletes it.
                tracing::warn!(partition_id = %self.partition, error = %e, "could not delete a replaced chunk body");
            }
        }
        *self.data.write() = fresh;
        self.next_chunk = next_chunk;
        self.dirty_persons.clear();
        self.unsealed = 0;
        self.marker = Some(marker.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::chunk::StoredEvent;
    use optiprism_types::event::Coerced;

    fn event(message_id: &str, person: u64) -> StoredEvent {
        StoredEvent {
            message_id: message_id.into(),
            distinct_id: format!("d{person}"),
            person_id: person,
            event: "e".into(),
            timestamp_ms: 1_000,
            props: vec![],
            person_set: vec![],
            person_set_once: vec![],
        }
    }

    #[test]
    fn message_keys_are_a_set_spread_over_shards_that_grow_apart() {
        let mut keys = MessageKeys::default();
        let ids: Vec<u128> = (0..20_000)
            .map(|i| message_key(ProjectId(1), &format!("m{i}")))
            .collect();
        assert!(ids.iter().all(|&k| keys.insert(k)));
        assert!(ids.iter().all(|&k| !keys.insert(k)));
        assert!(keys.insert(message_key(ProjectId(2), "m0")));
        // Every shard took some, the largest shares about twice the smallest.
        let sizes: Vec<usize> = keys.shards.iter().map(|s| s.len()).collect();
        let share = 20_001 / sizes.len();
        assert!(
            sizes.iter().all(|&n| n > share / 3 && n < share * 3),
            "{sizes:?}"
        );
        assert!(sizes[KEY_SHARDS - 1] > sizes[0], "{sizes:?}");
    }

    #[test]
    fn message_key_shards_double_at_counts_spread_over_an_octave() {
        // Uniform keys, as message keys are hashes.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut keys = MessageKeys::default();
        // For each shard, the partition's count of keys when the shard grew past 896 keys (to
        // 2,048 buckets).
        let mut grew_at = vec![None; KEY_SHARDS];
        for count in 1..=400_000_usize {
            let key = (u128::from(next()) << 64) | u128::from(next());
            let shard = MessageKeys::shard_of(key);
            let before = keys.shards[shard].capacity();
            assert!(keys.insert(key));
            let after = keys.shards[shard].capacity();
            if after != before && after >= 1_792 && grew_at[shard].is_none() {
                grew_at[shard] = Some(count);
            }
        }
        let counts: Vec<usize> = grew_at
            .iter()
            .map(|c| c.expect("every shard grew"))
            .collect();
        let (first, last) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        // Equal shares would all grow within a few percent of one count.
        assert!(*last as f64 > 1.7 * *first as f64, "{first}..{last}");
        // And no burst: at most a tenth of the shards within any 2% of the partition's count.
        let mut sorted = counts.clone();
        sorted.sort_unstable();
        for (i, &c) in sorted.iter().enumerate() {
            let within = sorted[i..]
                .iter()
                .take_while(|&&d| d as f64 <= c as f64 * 1.02);
            assert!(within.count() <= KEY_SHARDS / 10, "{sorted:?}");
        }
    }

    fn command(token: u128, parts: &[&[StoredEvent]]) -> Vec<u8> {
        let events: Vec<StoredEvent> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
        let proposed = ProposedRows::of(&events);
        optiprism_consensus::encode(&PartitionCommand::IngestRows {
            project: ProjectId(1),
            token,
            parts: parts.iter().map(|p| p.len() as u32).collect(),
            rows: encode_rows(&proposed.batch),
            person_sets: proposed.person_sets,
        })
    }

    /// An entry as nodes wrote it before proposals carried rows.
    fn legacy_command(token: u128, parts: &[&[StoredEvent]]) -> Vec<u8> {
        let events: Vec<StoredEvent> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
        optiprism_consensus::encode(&PartitionCommand::Ingest {
            project: ProjectId(1),
            token,
            parts: parts.iter().map(|p| p.len() as u32).collect(),
            events: encode_events(&events),
        })
    }

    /// Partition `partition`'s core in `db`, its chunk bodies under `dir`.
    fn open_core(
        db: &sled::Db,
        dir: &tempfile::TempDir,
        partition: u32,
        seal_rows: usize,
    ) -> PartitionCore {
        PartitionCore::open(db, &test_paths(dir), PartitionId(partition), seal_rows).unwrap()
    }

    /// The paths beside a test's sled database in `dir`.
    fn test_paths(dir: &tempfile::TempDir) -> DataPaths {
        DataPaths {
            chunks: dir.path().join("chunks"),
            sled_log: dir.path().join("db"),
        }
    }

    fn outcomes(bytes: &[u8]) -> Vec<(u32, u32)> {
        optiprism_consensus::decode::<Vec<IngestOutcome>>(bytes)
            .unwrap()
            .into_iter()
            .map(|o| (o.accepted, o.duplicates))
            .collect()
    }

    #[test]
    fn each_part_of_a_merged_proposal_gets_its_own_counts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        // The second request repeats one id of the first, and one of its own.
        let first = [event("a", 1), event("b", 2)];
        let second = [event("b", 2), event("c", 3), event("c", 3)];
        let applied = core.apply(1, &command(7, &[&first, &second]));
        assert_eq!(outcomes(&applied), [(2, 0), (1, 2)]);
        // Decoded from the log (a replica) or taken from this node's own proposal: the same.
        let events: Vec<StoredEvent> = [event("d", 4), event("a", 1)].into();
        core.local_proposals().insert(8, ProposedRows::of(&events));
        let local = core.apply(2, &command(8, &[&events]));
        let decoded = core.apply(3, &command(9, &[&[event("e", 5), event("d", 4)]]));
        assert_eq!(outcomes(&local), [(1, 1)]);
        assert_eq!(outcomes(&decoded), [(1, 1)]);
        assert_eq!(
            core.data().read().rows(ProjectId(1), 0, 2_000, None).rows,
            5
        );
    }

    #[test]
    fn a_command_whose_parts_do_not_add_up_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        let bad = optiprism_consensus::encode(&PartitionCommand::Ingest {
            project: ProjectId(1),
            token: 1,
            parts: vec![3],
            events: encode_events(&[event("a", 1)]),
        });
        assert!(outcomes(&core.apply(1, &bad)).is_empty());
        assert_eq!(
            core.data().read().rows(ProjectId(1), 0, 2_000, None).rows,
            0
        );
    }

    #[test]
    fn a_shipped_snapshot_replaces_a_replica_whose_chunks_differ() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut leader = open_core(&db, &dir, 0, 1 << 20);
        let mut follower = open_core(&db, &dir, 1, 1 << 20);
        // The leader seals twice, the follower once (its own boundaries and chunk ids), and
        // the follower also holds rows the snapshot does not (it will be replaced wholesale).
        leader.apply(1, &command(1, &[&[event("a", 1), event("b", 2)]]));
        leader.persist(b"m1").unwrap();
        leader.apply(2, &command(2, &[&[event("c", 3)]]));
        leader.persist(b"m2").unwrap();
        follower.apply(1, &command(3, &[&[event("a", 1), event("x", 9)]]));
        follower.persist(b"f1").unwrap();
        follower.apply(2, &command(4, &[&[event("y", 8)]]));
        let stale = follower.snapshot().unwrap();
        let description = leader.snapshot().unwrap();
        let shipped = leader.ship(&description).unwrap();
        follower.install(&shipped, b"m2").unwrap();
        let rows = |core: &PartitionCore| {
            let data = core.data();
            let data = data.read();
            let mut ids: Vec<String> = data
                .rows(ProjectId(1), 0, 2_000, None)
                .batches
                .iter()
                .flat_map(|b| {
                    use arrow::array::AsArray;
                    b.column_by_name("uuid")
                        .unwrap()
                        .as_string::<i32>()
                        .iter()
                        .map(|v| v.unwrap().to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(rows(&follower), ["a", "b", "c"]);
        assert_eq!(rows(&follower), rows(&leader));
        assert_eq!(follower.persisted_marker().as_deref(), Some(&b"m2"[..]));
        // Deduplication carries over: ids of the snapshot are known to the follower.
        let again = follower.apply(3, &command(5, &[&[event("c", 3), event("d", 4)]]));
        assert_eq!(outcomes(&again), [(1, 1)]);
        // The follower's own body went with it: its directory holds the leader's two.
        assert_eq!(body_files(dir.path(), 1), 2);
        // A description of the follower's state from before names chunk 0 of project 1, as
        // the installed one does, but not the same chunk: it cannot be shipped any more.
        let e = follower.ship(&stale).unwrap_err().to_string();
        assert!(e.contains("does not hold"), "{e}");
        // And the replaced state is what the follower reopens with.
        drop(follower);
        let reopened = open_core(&db, &dir, 1, 1 << 20);
        assert_eq!(rows(&reopened), ["a", "b", "c"]);
        assert_eq!(body_files(dir.path(), 1), 2);
    }

    /// The nice value of each thread of this process named `name` (Linux's `/proc`).
    #[cfg(target_os = "linux")]
    fn nice_of_threads_named(name: &str) -> Vec<i32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let dir = task.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                if comm.trim_end() != name {
                    return None;
                }
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                // Fields after the parenthesised command: state is the 3rd field, nice the 19th.
                let after = stat.rsplit_once(')')?.1;
                after.split_whitespace().nth(16)?.parse().ok()
            })
            .collect()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_sealer_runs_at_background_priority() {
        // Starting the process's sealer thread: a barrier goes through it.
        wait_for_queued_seals();
        assert_eq!(
            nice_of_threads_named("sealer"),
            vec![crate::storage::BACKGROUND_NICE]
        );
    }

    #[test]
    fn a_closed_partition_seals_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        core.apply(1, &command(1, &[&[event("a", 1)]]));
        core.close();
        core.persist_soon(b"m1").unwrap();
        wait_for_queued_seals();
        assert_eq!(body_files(dir.path(), 0), 0);
        assert_eq!(core.tree.get("marker").unwrap(), None);
        assert!(core.persist(b"m2").is_err());
    }

    #[test]
    fn a_failed_seal_and_the_ones_behind_it_are_retried_in_order_once_the_disk_takes_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        let bodies = dir.path().join("chunks").join("p0");
        std::fs::remove_dir_all(&bodies).unwrap();
        std::fs::write(&bodies, b"not a directory").unwrap();
        core.apply(1, &command(1, &[&[event("a", 1), event("b", 2)]]));
        core.persist_soon(b"m1").unwrap();
        wait_for_queued_seals();
        let failure = core.seal_failure();
        assert!(failure.error().is_some(), "the write into a file must fail");
        // A later seal waits behind the failed one, and a snapshot cannot pass either.
        core.apply(2, &command(2, &[&[event("c", 3)]]));
        core.persist_soon(b"m2").unwrap();
        wait_for_queued_seals();
        assert_eq!(core.tree.get("marker").unwrap(), None);
        assert!(core.persist(b"m3").is_err());
        std::fs::remove_file(&bodies).unwrap();
        std::fs::create_dir(&bodies).unwrap();
        optiprism_testkit::eventually(
            || format!("no retry: {:?}", failure.error()),
            || failure.error().is_none(),
        );
        // Each held job wrote its chunk, the last one's marker stands, and the m3 rows (a
        // persist that failed hands its rows over all the same) came with them.
        assert_eq!(
            core.tree.get("marker").unwrap().as_deref(),
            Some(&b"m3"[..])
        );
        assert_eq!(body_files(dir.path(), 0), 2);
        let rows = core
            .data()
            .read()
            .rows(ProjectId(1), i64::MIN, i64::MAX, None);
        assert_eq!(rows.rows, 3);
        let sealed = contents(&core);
        drop(core);
        let reopened = open_core(&db, &dir, 0, 1 << 20);
        assert_eq!(contents(&reopened), sealed);
    }

    /// How many files partition `p`'s chunk directory under `dir` holds.
    fn body_files(dir: &std::path::Path, p: u32) -> usize {
        std::fs::read_dir(dir.join("chunks").join(format!("p{p}")))
            .unwrap()
            .count()
    }

    #[test]
    fn bodies_an_older_version_kept_in_sled_move_to_files_and_unnamed_bodies_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let chunks = dir.path().join("chunks");
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        core.apply(1, &command(1, &[&[event("a", 1), event("b", 2)]]));
        core.persist(b"m1").unwrap();
        core.apply(2, &command(2, &[&[event("c", 3)]]));
        core.persist(b"m2").unwrap();
        let sealed = contents(&core);
        drop(core);
        // Made into what an older version left: bodies under `c/`, one of them named by no
        // metadata (a crash between body and batch), and no files; plus a file a crash left
        // before its batch.
        let tree = db.open_tree(data_tree(PartitionId(0))).unwrap();
        for item in tree.scan_prefix(b"m/") {
            let meta: ChunkMeta = optiprism_consensus::decode(&item.unwrap().1).unwrap();
            let file = body_file(&tree, &meta).unwrap().unwrap();
            let body = ChunkFiles::open(&chunks, PartitionId(0))
                .unwrap()
                .read(file)
                .unwrap();
            tree.insert(chunk_key(b'c', meta.project, meta.id), body)
                .unwrap();
            tree.remove(chunk_key(b'b', meta.project, meta.id)).unwrap();
        }
        tree.insert(chunk_key(b'c', ProjectId(1), 99), &b"unnamed"[..])
            .unwrap();
        std::fs::remove_dir_all(chunks.join("p0")).unwrap();
        std::fs::create_dir_all(chunks.join("p0")).unwrap();
        std::fs::write(
            chunks.join("p0").join("00000001-0000000000000005-00.chunk"),
            b"x",
        )
        .unwrap();

        let reopened = open_core(&db, &dir, 0, 1 << 20);
        assert_eq!(contents(&reopened), sealed);
        assert_eq!(tree.scan_prefix(b"c/").count(), 0);
        assert_eq!(tree.scan_prefix(b"b/").count(), 2);
        assert_eq!(body_files(dir.path(), 0), 2);
        drop(reopened);
        let again = open_core(&db, &dir, 0, 1 << 20);
        assert_eq!(contents(&again), sealed);
        // A replica moved away leaves nothing behind.
        drop(again);
        drop(tree);
        drop_partition_storage(&db, &test_paths(&dir), PartitionId(0)).unwrap();
        assert!(!chunks.join("p0").exists());
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n == data_tree(PartitionId(0)).as_bytes())
        );
    }

    #[test]
    fn background_seals_keep_rows_visible_and_land_before_a_synchronous_persist() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 2);
        let count =
            |core: &PartitionCore| core.data().read().rows(ProjectId(1), 0, 2_000, None).rows;
        for i in 0..7u64 {
            let id = format!("e{i}");
            core.apply(i + 1, &command(u128::from(i) + 100, &[&[event(&id, i)]]));
            if core.wants_persist() {
                core.persist_soon(format!("m{i}").as_bytes()).unwrap();
            }
            // Whether sealed, being sealed or unsealed, every applied row is visible.
            assert_eq!(count(&core), i as usize + 1);
        }
        core.persist(b"m-final").unwrap();
        assert_eq!(core.data().read().sealing.len(), 0);
        drop(core);
        let reopened = open_core(&db, &dir, 0, 2);
        assert_eq!(count(&reopened), 7);
        assert_eq!(
            reopened.persisted_marker().as_deref(),
            Some(&b"m-final"[..])
        );
    }

    #[test]
    fn a_durable_snapshot_is_the_last_completed_seal_not_the_rows_applied_since() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1_000);
        let read = |core: &PartitionCore| (core.durable_snapshot().unwrap())().unwrap();
        assert!(read(&core).is_none(), "nothing sealed yet");
        for i in 0..3u64 {
            core.apply(
                i + 1,
                &command(u128::from(i), &[&[event(&format!("a{i}"), i)]]),
            );
        }
        core.persist(b"m3").unwrap();
        let (marker, description) = read(&core).unwrap();
        assert_eq!(marker, b"m3");
        // The same chunks and persons as the in-memory snapshot (persons in key order).
        let decoded = |bytes: &[u8]| {
            let mut s: PartitionSnapshot = optiprism_consensus::decode(bytes).unwrap();
            s.persons
                .sort_by_key(|(project, person, _)| (*project, *person));
            optiprism_consensus::encode(&s)
        };
        assert_eq!(decoded(&description), decoded(&core.snapshot().unwrap()));
        // Rows applied after it stay out until they are sealed, however they are sealed.
        for i in 3..5u64 {
            core.apply(
                i + 1,
                &command(u128::from(i), &[&[event(&format!("b{i}"), i)]]),
            );
        }
        let (marker, later) = read(&core).unwrap();
        assert_eq!((marker.as_slice(), &later), (&b"m3"[..], &description));
        core.persist(b"m5").unwrap();
        let (marker, sealed) = read(&core).unwrap();
        assert_eq!(marker, b"m5");
        let snapshot: PartitionSnapshot = optiprism_consensus::decode(&sealed).unwrap();
        assert_eq!(snapshot.chunks.iter().map(|c| c.rows).sum::<u64>(), 5);
    }

    #[test]
    fn a_seal_writes_persons_as_of_its_marker_though_apply_changes_them_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut held = open_core(&db, &dir, 0, 1_000);
        let mut core = open_core(&db, &dir, 1, 1_000);
        let setting = |id: &str, plan: &str| StoredEvent {
            person_set: vec![("plan".into(), PropValue::Str(plan.into()))],
            ..event(id, 7)
        };
        // The one sealer thread writes partition 0's seal under that partition's cut: holding
        // the cut here holds the sealer there, so partition 1's seal waits in the queue.
        held.apply(1, &command(1, &[&[event("h", 1)]]));
        let cut = Arc::clone(&held.sealer.cut);
        let holding = cut.lock();
        held.persist_soon(b"h1").unwrap();
        core.apply(1, &command(2, &[&[setting("a", "free")]]));
        core.persist_soon(b"m1").unwrap();
        core.apply(2, &command(3, &[&[setting("b", "pro")]]));
        drop(holding);
        wait_for_queued_seals();
        let plan = |row: &PersonRow| row.properties.get("plan").cloned();
        let (marker, description) = (core.durable_snapshot().unwrap())().unwrap().unwrap();
        let sealed: PartitionSnapshot = optiprism_consensus::decode(&description).unwrap();
        assert_eq!(marker, b"m1");
        assert_eq!(
            sealed
                .persons
                .iter()
                .map(|(_, _, row)| plan(row))
                .collect::<Vec<_>>(),
            [Some(PropValue::Str("free".into()))]
        );
        let live = core.data().read().persons(ProjectId(1));
        assert_eq!(plan(&live[0].1), Some(PropValue::Str("pro".into())));
    }

    /// The rows and persons of a core, to compare two of them.
    fn contents(core: &PartitionCore) -> (String, Vec<(ProjectId, PersonId, PersonRow)>) {
        let data = core.data();
        let data = data.read();
        let rows = data.rows(ProjectId(1), i64::MIN, i64::MAX, None);
        let mut persons: Vec<_> = data
            .persons
            .iter()
            .map(|((project, person), row)| (*project, *person, PersonRow::clone(row)))
            .collect();
        persons.sort_by_key(|(project, person, _)| (*project, *person));
        // Compared by value: rows filtered of a duplicate keep its strings in their
        // dictionaries, unused.
        let values: Vec<Vec<arrow::array::ArrayRef>> = rows
            .batches
            .iter()
            .map(|b| {
                b.columns()
                    .iter()
                    .map(|c| match c.data_type() {
                        arrow::datatypes::DataType::Dictionary(_, v) => {
                            arrow::compute::cast(c, v).unwrap()
                        }
                        _ => Arc::clone(c),
                    })
                    .collect()
            })
            .collect();
        (format!("{values:?}"), persons)
    }

    #[test]
    fn entries_written_as_events_apply_as_entries_of_rows_do() {
        let with_props = |id: &str, person: u64, plan: &str| StoredEvent {
            props: vec![
                ("plan".into(), Coerced::Str(plan.into())),
                ("n".into(), Coerced::Mismatch("x".into())),
            ],
            person_set: vec![("name".into(), PropValue::Str(format!("p{person}")))],
            person_set_once: vec![("first".into(), PropValue::Str(id.into()))],
            ..event(id, person)
        };
        let first = [
            with_props("a", 1, "pro"),
            event("b", 2),
            with_props("a", 1, "x"),
        ];
        let second = [event("c", 3), with_props("d", 1, "team")];
        let (dir_rows, dir_events) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (db_rows, db_events) = (
            sled::open(dir_rows.path()).unwrap(),
            sled::open(dir_events.path()).unwrap(),
        );
        let mut rows = open_core(&db_rows, &dir_rows, 0, 1 << 20);
        let mut events = open_core(&db_events, &dir_events, 0, 1 << 20);
        let a = rows.apply(1, &command(1, &[&first, &second]));
        let b = events.apply(1, &legacy_command(1, &[&first, &second]));
        assert_eq!(outcomes(&a), [(2, 1), (2, 0)]);
        assert_eq!(outcomes(&a), outcomes(&b));
        assert_eq!(contents(&rows), contents(&events));
        let person = &contents(&rows).1[0].2;
        assert_eq!(person.properties["name"], PropValue::Str("p1".into()));
        assert_eq!(person.properties["first"], PropValue::Str("a".into()));
    }

    #[test]
    fn an_entry_whose_rows_cannot_be_read_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        let good = ProposedRows::of(&[event("a", 1), event("b", 2)]);
        let entry = |rows: Vec<u8>, person_sets: Vec<PersonSets>| {
            optiprism_consensus::encode(&PartitionCommand::IngestRows {
                project: ProjectId(1),
                token: 1,
                parts: vec![2],
                rows,
                person_sets,
            })
        };
        // Not compressed rows, not IPC, rows of another layout, person properties of a row
        // the entry does not have.
        let not_ipc = compress_framed(b"not arrow");
        let other_layout = encode_rows(&good.batch.project(&[0, 2, 1, 3, 4]).unwrap());
        let stray = vec![PersonSets {
            row: 2,
            set: vec![],
            set_once: vec![],
        }];
        for bad in [
            entry(b"junk".to_vec(), vec![]),
            entry(not_ipc, vec![]),
            entry(other_layout, vec![]),
            entry(encode_rows(&good.batch), stray),
        ] {
            assert!(outcomes(&core.apply(1, &bad)).is_empty());
        }
        assert_eq!(contents(&core).1.len(), 0);
        assert_eq!(
            core.data().read().rows(ProjectId(1), 0, 2_000, None).rows,
            0
        );
        // The same rows, readable: stored.
        let ok = core.apply(2, &entry(encode_rows(&good.batch), vec![]));
        assert_eq!(outcomes(&ok), [(2, 0)]);
    }

    #[test]
    fn the_proposer_fails_an_entry_too_large_to_decode_as_the_other_replicas_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut proposer = open_core(&db, &dir, 0, 1 << 20);
        let mut replica = open_core(&db, &dir, 1, 1 << 20);
        let rows = ProposedRows::of(&[event("a", 1), event("b", 2)]);
        // Rows whose length prefix claims one byte over what any replica decodes.
        let mut oversized = ((MAX_DECODED_EVENTS_BYTES + 1) as u32)
            .to_le_bytes()
            .to_vec();
        oversized.extend_from_slice(b"rows");
        assert_eq!(
            rows_fit_an_entry(&oversized),
            Err((MAX_DECODED_EVENTS_BYTES + 1, MAX_DECODED_EVENTS_BYTES))
        );
        assert_eq!(rows_fit_an_entry(&encode_rows(&rows.batch)), Ok(()));
        let entry = optiprism_consensus::encode(&PartitionCommand::IngestRows {
            project: ProjectId(1),
            token: 7,
            parts: vec![2],
            rows: oversized,
            person_sets: rows.person_sets.clone(),
        });
        // The proposer holds the rows decoded; the replica has only the entry.
        proposer.local_proposals().insert(7, rows);
        assert!(outcomes(&proposer.apply(1, &entry)).is_empty());
        assert!(outcomes(&replica.apply(1, &entry)).is_empty());
        for core in [&proposer, &replica] {
            assert_eq!(contents(core).1.len(), 0);
            assert_eq!(
                core.data().read().rows(ProjectId(1), 0, 2_000, None).rows,
                0
            );
        }
    }

    #[test]
    fn no_corruption_of_an_entrys_rows_panics_apply() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut core = open_core(&db, &dir, 0, 1 << 20);
        let events: Vec<StoredEvent> = (0..3)
            .map(|i| StoredEvent {
                props: vec![
                    ("plan".into(), Coerced::Str(format!("p{i}"))),
                    ("n".into(), Coerced::Num(i as f64)),
                ],
                ..event(&format!("m{i}"), i)
            })
            .collect();
        let ipc = {
            let mut raw = Vec::new();
            let rows = encode_rows(&ProposedRows::of(&events).batch);
            decompress_framed(&rows, &mut raw).unwrap().to_vec()
        };
        // Every byte of the IPC stream in turn, flipped: each entry is either refused or
        // stored, and apply goes on.
        for (i, token) in (0..ipc.len()).zip(1u128..) {
            let mut bad = ipc.clone();
            bad[i] ^= 0xff;
            let entry = optiprism_consensus::encode(&PartitionCommand::IngestRows {
                project: ProjectId(1),
                token,
                parts: vec![3],
                rows: compress_framed(&bad),
                person_sets: vec![],
            });
            core.apply(i as u64 + 1, &entry);
        }
        let data = core.data();
        let rows = data.read().rows(ProjectId(1), i64::MIN, i64::MAX, None);
        for b in &rows.batches {
            chunk::BatchLayout::read(b).unwrap();
        }
    }

    fn any_coerced() -> impl proptest::strategy::Strategy<Value = optiprism_types::event::Coerced> {
        use optiprism_types::event::Coerced;
        use proptest::prelude::*;
        prop_oneof![
            "\\PC{0,8}".prop_map(Coerced::Str),
            any::<f64>().prop_map(Coerced::Num),
            any::<bool>().prop_map(Coerced::Bool),
            any::<i64>().prop_map(Coerced::DateTimeMs),
            "\\PC{0,8}".prop_map(Coerced::Mismatch),
        ]
    }

    fn any_event() -> impl proptest::strategy::Strategy<Value = StoredEvent> {
        use proptest::prelude::*;
        let person_value = prop_oneof![
            "\\PC{0,6}".prop_map(PropValue::Str),
            (-1e9f64..1e9).prop_map(PropValue::Num),
            any::<bool>().prop_map(PropValue::Bool),
            "\\PC{0,6}".prop_map(PropValue::Json),
        ];
        let person_props = proptest::collection::vec(("[a-c]{1,2}", person_value), 0..3);
        (
            (
                "\\PC{1,12}",
                "\\PC{0,12}",
                any::<u64>(),
                "\\PC{0,10}",
                any::<i64>(),
            ),
            proptest::collection::vec(("[a-e]{1,3}", any_coerced()), 0..6),
            person_props.clone(),
            person_props,
        )
            .prop_map(
                |(
                    (message_id, distinct_id, person_id, event, timestamp_ms),
                    props,
                    person_set,
                    person_set_once,
                )| {
                    StoredEvent {
                        message_id,
                        distinct_id,
                        person_id,
                        event,
                        timestamp_ms,
                        props,
                        person_set,
                        person_set_once,
                    }
                },
            )
    }

    proptest::proptest! {
        /// Replicas decode entries into [`StoredEventRef`], borrowing the text; the node that
        /// proposed them applies the [`StoredEvent`]s it holds. Both must be the same events,
        /// and give the same rows, or replicas would drift apart.
        #[test]
        fn borrowed_decoding_reads_what_owned_events_hold(events in proptest::collection::vec(any_event(), 0..40)) {
            use chunk::CoercedRef;
            let bytes = encode_events(&events);
            let mut raw = Vec::new();
            let borrowed: Vec<StoredEventRef<'_>> =
                optiprism_consensus::decode_borrowed(decompress_framed(&bytes, &mut raw).unwrap()).unwrap();
            proptest::prop_assert_eq!(&decode_events(&bytes).unwrap(), &events);
            proptest::prop_assert_eq!(borrowed.len(), events.len());
            for (owned, read) in events.iter().zip(&borrowed) {
                proptest::prop_assert_eq!(owned.message_id(), read.message_id());
                proptest::prop_assert_eq!(owned.distinct_id(), read.distinct_id());
                proptest::prop_assert_eq!(owned.person_id(), read.person_id());
                proptest::prop_assert_eq!(owned.event(), read.event());
                proptest::prop_assert_eq!(owned.timestamp_ms(), read.timestamp_ms());
                let (a, b): (Vec<(&str, CoercedRef<'_>)>, Vec<_>) = (owned.props().collect(), read.props().collect());
                // Compared by bits: NaN must come back as the same NaN.
                proptest::prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
                proptest::prop_assert_eq!(owned.person_set(), read.person_set());
                proptest::prop_assert_eq!(owned.person_set_once(), read.person_set_once());
            }
            let (mut from_owned, mut from_borrowed) = (ChunkBuilder::default(), ChunkBuilder::default());
            events.iter().for_each(|e| from_owned.append(e));
            borrowed.iter().for_each(|e| from_borrowed.append(e));
            let (a, b) = (from_owned.finish(), from_borrowed.finish());
            proptest::prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
    }
}
