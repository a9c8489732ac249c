//! Reading partitions held by other nodes, over Arrow Flight.
//!
//! When a cluster has more members than replicas per partition, a node answering a query holds
//! only some partitions. For each of the others it asks a replica (the leader it last saw
//! answering proposals first, then the partition map's replicas in turn) with a scan ticket:
//! `{"scan": {"partition", "what": "rows" | "persons", "start_ms", "end_ms", "events"}}`. The
//! replica first waits for a read index from the partition's leader, so it answers with every
//! acknowledged event, then sends the same rows it would read for a local query; the asking
//! node runs the whole query over them, so the answer is the one a node holding every
//! partition gives. Rows travel as Arrow IPC streams, one per batch, in a `LargeBinary` column
//! (batches of one partition differ in their property columns).

use crate::metadata::Project;
use crate::query::{PersonRows, QueryFailure, RemotePartitions};
use crate::server::NodeShared;
use crate::storage::partition::ProjectRows;
use arrow::array::{Array, LargeBinaryArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use futures::TryStreamExt;
use optiprism_consensus::GroupId;
use optiprism_types::PartitionId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// What a scan ticket asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scan {
    /// The partition.
    pub partition: u32,
    /// `rows` or `persons`.
    pub what: ScanWhat,
    /// Rows that may hold events at or after this time (epoch ms).
    #[serde(default = "min_ms")]
    pub start_ms: i64,
    /// … and before this time.
    #[serde(default = "max_ms")]
    pub end_ms: i64,
    /// Only these event names (`None`: any).
    #[serde(default)]
    pub events: Option<Vec<String>>,
}

fn min_ms() -> i64 {
    i64::MIN
}

fn max_ms() -> i64 {
    i64::MAX
}

/// What a scan returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScanWhat {
    /// Event rows.
    Rows,
    /// Person rows.
    Persons,
}

/// The ticket wrapper: `{"scan": …}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanTicket {
    /// The scan.
    pub scan: Scan,
}

fn payload_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(
        "payload",
        DataType::LargeBinary,
        false,
    )]))
}

/// Answers a scan of a partition held here, after catching up with its leader.
pub async fn answer_scan(
    node: &NodeShared,
    project: &Project,
    scan: &Scan,
) -> Result<RecordBatch, QueryFailure> {
    let group = GroupId::partition(PartitionId(scan.partition));
    let hosted = node.partitions.read().get(&scan.partition).cloned();
    let Some(hosted) = hosted else {
        return Err(QueryFailure::Unavailable(format!(
            "node {} holds no replica of {group}",
            node.node_id()
        )));
    };
    node.group_barrier(group, &hosted.group.raft)
        .await
        .map_err(|e| QueryFailure::Unavailable(e.to_string()))?;
    let data = node
        .query
        .local_partitions()
        .get(&scan.partition)
        .cloned()
        .ok_or_else(|| QueryFailure::Unavailable(format!("{group} moved away")))?;
    let payloads: Vec<Vec<u8>> = match scan.what {
        ScanWhat::Rows => {
            let rows = data.read().rows(
                project.id,
                scan.start_ms,
                scan.end_ms,
                scan.events.as_deref(),
            );
            rows.batches
                .iter()
                .map(ipc_bytes)
                .collect::<Result<_, _>>()?
        }
        ScanWhat::Persons => {
            let persons = data.read().persons(project.id);
            vec![optiprism_consensus::encode(&persons)]
        }
    };
    let column = LargeBinaryArray::from_iter_values(payloads.iter());
    RecordBatch::try_new(payload_schema(), vec![Arc::new(column)])
        .map_err(|e| QueryFailure::Internal(e.to_string()))
}

fn ipc_bytes(batch: &RecordBatch) -> Result<Vec<u8>, QueryFailure> {
    let internal = |e: arrow::error::ArrowError| QueryFailure::Internal(e.to_string());
    let mut out = Vec::new();
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
    writer.write(batch).map_err(internal)?;
    writer.finish().map_err(internal)?;
    drop(writer);
    Ok(out)
}

fn from_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>, QueryFailure> {
    let reader = arrow::ipc::reader::StreamReader::try_new(bytes, None)
        .map_err(|e| QueryFailure::Internal(format!("undecodable scan answer: {e}")))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| QueryFailure::Internal(format!("undecodable scan answer: {e}")))
}

/// Reads other nodes' partitions over Flight (see the module documentation).
#[derive(Debug)]
pub struct FlightRemote {
    node: Weak<NodeShared>,
    channels: parking_lot::Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl FlightRemote {
    /// The remote reader of `node`.
    pub fn new(node: &Arc<NodeShared>) -> Arc<FlightRemote> {
        Arc::new(FlightRemote {
            node: Arc::downgrade(node),
            channels: parking_lot::Mutex::default(),
        })
    }

    fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, QueryFailure> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| QueryFailure::Internal(format!("bad Flight address {addr}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// The payload cells of a scan, from the first replica that answers.
    async fn scan(&self, project: &Project, scan: Scan) -> Result<Vec<Vec<u8>>, QueryFailure> {
        let node = self
            .node
            .upgrade()
            .ok_or_else(|| QueryFailure::Unavailable("the node is shutting down".into()))?;
        let group = GroupId::partition(PartitionId(scan.partition));
        let mut candidates = node.proposer.candidates(group);
        candidates.retain(|&c| c != node.node_id());
        let members = node.members();
        let ticket = serde_json::to_vec(&ScanTicket { scan }).expect("a scan serializes");
        let mut errors = Vec::new();
        for target in candidates {
            let Some(addr) = members.get(&target).map(|a| a.flight.clone()) else {
                continue;
            };
            match self.fetch(&addr, &project.api_token, ticket.clone()).await {
                Ok(cells) => return Ok(cells),
                Err(e) => errors.push(format!("node {target}: {e}")),
            }
        }
        Err(QueryFailure::Unavailable(format!(
            "no replica of {group} answered ({})",
            errors.join("; ")
        )))
    }

    async fn fetch(
        &self,
        addr: &str,
        token: &str,
        ticket: Vec<u8>,
    ) -> Result<Vec<Vec<u8>>, String> {
        let inner = arrow_flight::flight_service_client::FlightServiceClient::new(
            self.channel(addr).map_err(|e| e.to_string())?,
        )
        .max_decoding_message_size(1 << 30);
        let mut client = arrow_flight::FlightClient::new_from_inner(inner);
        client
            .add_header("authorization", &format!("Bearer {token}"))
            .map_err(|e| e.to_string())?;
        let stream = client
            .do_get(arrow_flight::Ticket::new(ticket))
            .await
            .map_err(|e| e.to_string())?;
        let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| e.to_string())?;
        let mut cells = Vec::new();
        for b in &batches {
            let column = b
                .column(0)
                .as_any()
                .downcast_ref::<LargeBinaryArray>()
                .ok_or("a scan answer without its payload column")?;
            for i in 0..column.len() {
                cells.push(column.value(i).to_vec());
            }
        }
        Ok(cells)
    }
}

#[async_trait::async_trait]
impl RemotePartitions for FlightRemote {
    async fn rows(
        &self,
        partition: u32,
        project: &Project,
        start_ms: i64,
        end_ms: i64,
        events: Option<Vec<String>>,
    ) -> Result<ProjectRows, QueryFailure> {
        let scan = Scan {
            partition,
            what: ScanWhat::Rows,
            start_ms,
            end_ms,
            events,
        };
        let mut out = ProjectRows::default();
        for cell in self.scan(project, scan).await? {
            for batch in from_ipc(&cell)? {
                out.rows += batch.num_rows();
                out.batches.push(batch);
            }
        }
        Ok(out)
    }

    async fn persons(&self, partition: u32, project: &Project) -> Result<PersonRows, QueryFailure> {
        let scan = Scan {
            partition,
            what: ScanWhat::Persons,
            start_ms: i64::MIN,
            end_ms: i64::MAX,
            events: None,
        };
        let cells = self.scan(project, scan).await?;
        let cell = cells
            .first()
            .ok_or_else(|| QueryFailure::Internal("an empty persons answer".into()))?;
        optiprism_consensus::decode(cell)
            .map_err(|e| QueryFailure::Internal(format!("undecodable persons answer: {e}")))
    }
}
