//! The gRPC service: Flight SQL via `FlightSqlService`, plus JSON tickets on plain `DoGet`.
//!
//! Flight SQL queries run when the client asks for their `FlightInfo`, so errors surface there
//! (as `InvalidArgument` for bad SQL) and the schema in the `FlightInfo` is exactly the schema
//! of the stream `DoGet` returns, which ADBC checks. Results wait under a random handle until
//! fetched, at most [`RESULT_TTL`]. Dictionary columns are sent as plain columns and every field
//! as nullable, so the advertised and the streamed schema cannot drift apart.

use crate::backend::FlightBackend;
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{
    FlightService as FlightServiceTrait, FlightServiceServer,
};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, Any, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, IpcMessage, PollInfo, PutResult, SchemaAsIpc,
    SchemaResult, Ticket,
};
use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use parking_lot::Mutex;
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

/// How long an executed result waits to be fetched.
pub const RESULT_TTL: Duration = Duration::from_secs(300);
/// Largest gRPC message accepted or sent (tonic's 4 MiB default is too small for batches).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The catalog and schema tables are listed under (DataFusion's defaults, so qualified names work).
pub const CATALOG: &str = "datafusion";
/// See [`CATALOG`].
pub const DB_SCHEMA: &str = "public";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Prepared {
    sql: String,
    params: Option<RecordBatch>,
    token: String,
}

struct Stored {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    token: String,
    at: Instant,
}

/// The Flight SQL half of the service.
pub struct SqlService<B: FlightBackend> {
    backend: Arc<B>,
    prepared: Mutex<HashMap<Bytes, Prepared>>,
    results: Mutex<HashMap<Bytes, Stored>>,
    sql_info: SqlInfoData,
}

impl<B: FlightBackend> std::fmt::Debug for SqlService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlService").finish_non_exhaustive()
    }
}

fn token_of(metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let value = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <api token>`"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| {
            Status::unauthenticated("the authorization header must be `Bearer <api token>`")
        })
}

fn random_handle() -> Bytes {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    Bytes::from(format!("{n:032x}"))
}

/// Plain columns instead of dictionaries, every field nullable.
fn flight_schema(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                let ty = match f.data_type() {
                    DataType::Dictionary(_, v) => v.as_ref().clone(),
                    other => other.clone(),
                };
                Field::new(f.name(), ty, true)
            })
            .collect::<Vec<_>>(),
    ))
}

fn conform(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch, Status> {
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(Arc::clone(c))
            } else {
                arrow::compute::cast(c, f.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Status::internal(e.to_string()))?;
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|e| Status::internal(e.to_string()))
}

fn stream_batches(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<BoxStream<FlightData>, Status> {
    let batches = batches
        .iter()
        .map(|b| conform(&schema, b))
        .collect::<Result<Vec<_>, _>>()?;
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Ok(Box::pin(stream))
}

fn schema_bytes(schema: &Schema) -> Result<Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(bytes)
}

impl<B: FlightBackend> SqlService<B> {
    /// A service over `backend`.
    pub fn new(backend: Arc<B>) -> SqlService<B> {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "Optiprism");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        SqlService {
            backend,
            prepared: Mutex::new(HashMap::new()),
            results: Mutex::new(HashMap::new()),
            sql_info: info.build().expect("static SQL info is valid"),
        }
    }

    fn session(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(String, B::Session), Status> {
        let token = token_of(metadata)?;
        let session = self.backend.authenticate(&token)?;
        Ok((token, session))
    }

    /// Runs SQL and keeps the result for `DoGet`; returns its `FlightInfo`.
    async fn execute(
        &self,
        token: String,
        session: &B::Session,
        sql: String,
        params: Option<RecordBatch>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let (schema, batches) = self.backend.sql(session, sql, params).await?;
        let schema = flight_schema(&schema);
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let handle = random_handle();
        {
            let mut results = self.results.lock();
            results.retain(|_, r| r.at.elapsed() < RESULT_TTL);
            results.insert(
                handle.clone(),
                Stored {
                    schema: Arc::clone(&schema),
                    batches,
                    token,
                    at: Instant::now(),
                },
            );
        }
        let ticket = TicketStatementQuery {
            statement_handle: handle,
        };
        FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| {
                info.with_endpoint(
                    FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
                )
                .with_descriptor(descriptor)
                .with_total_records(rows as i64)
                .with_ordered(true)
            })
    }

    /// Answers a JSON insight ticket.
    async fn insight(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let (_, session) = self.session(request.metadata())?;
        let batch = self
            .backend
            .insight(&session, request.into_inner().ticket.to_vec())
            .await?;
        let schema = flight_schema(&batch.schema());
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }
}

#[tonic::async_trait]
impl<B: FlightBackend> FlightSqlService for SqlService<B> {
    type FlightService = SqlService<B>;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<BoxStream<HandshakeResponse>>, Status> {
        // Basic auth with the API token as password (any user name), for clients that only
        // speak user/password; answered with the bearer token to use from then on.
        use base64::Engine;
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("missing authorization"))?;
        let token = if let Some(basic) = header.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .map_err(|_| Status::unauthenticated("malformed basic auth"))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| Status::unauthenticated("malformed basic auth"))?;
            text.split_once(':')
                .map(|(_, p)| p.to_string())
                .unwrap_or_default()
        } else {
            token_of(request.metadata())?
        };
        self.backend.authenticate(&token)?;
        let response = HandshakeResponse {
            protocol_version: 0,
            payload: Bytes::from(token.clone()),
        };
        let mut out: Response<BoxStream<HandshakeResponse>> =
            Response::new(Box::pin(futures::stream::once(async move { Ok(response) })));
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("token is not a valid header"))?;
        out.metadata_mut().insert("authorization", value);
        Ok(out)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (token, session) = self.session(request.metadata())?;
        let info = self
            .execute(token, &session, query.query, None, request.into_inner())
            .await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let (token, session) = self.session(request.metadata())?;
        let (sql, params) = {
            let prepared = self.prepared.lock();
            let p = prepared
                .get(&cmd.prepared_statement_handle)
                .filter(|p| p.token == token)
                .ok_or_else(|| Status::invalid_argument("unknown prepared statement handle"))?;
            (p.sql.clone(), p.params.clone())
        };
        let info = self
            .execute(token, &session, sql, params, request.into_inner())
            .await?;
        Ok(Response::new(info))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let token = token_of(request.metadata())?;
        let stored = self
            .results
            .lock()
            .remove(&ticket.statement_handle)
            .filter(|s| s.token == token)
            .ok_or_else(|| Status::not_found("unknown or expired result ticket"))?;
        Ok(Response::new(stream_batches(
            stored.schema,
            stored.batches,
        )?))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (token, session) = self.session(request.metadata())?;
        let schema = self
            .backend
            .sql_schema(&session, query.query.clone())
            .await?;
        let handle = random_handle();
        self.prepared.lock().insert(
            handle.clone(),
            Prepared {
                sql: query.query,
                params: None,
                token,
            },
        );
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle,
            dataset_schema: schema_bytes(&flight_schema(&schema))?,
            parameter_schema: Bytes::new(),
        })
    }

    async fn do_put_prepared_statement_query(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let token = token_of(request.metadata())?;
        let stream = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(|e| e.into()),
        );
        let batches: Vec<RecordBatch> = stream
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let params = match batches.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => {
                let schema = many[0].schema();
                Some(
                    arrow::compute::concat_batches(&schema, many)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                )
            }
        };
        let mut prepared = self.prepared.lock();
        let p = prepared
            .get_mut(&cmd.prepared_statement_handle)
            .filter(|p| p.token == token)
            .ok_or_else(|| Status::invalid_argument("unknown prepared statement handle"))?;
        p.params = params;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(cmd.prepared_statement_handle),
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        self.prepared
            .lock()
            .remove(&query.prepared_statement_handle);
        Ok(())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.sql_info).schema();
        metadata_info(&query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let builder = query.into_builder(&self.sql_info);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.session(request.metadata())?;
        let schema = query.into_builder().schema();
        metadata_info(&query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        self.session(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.session(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        metadata_info(&query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        self.session(request.metadata())?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, DB_SCHEMA);
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.session(request.metadata())?;
        let schema = query.clone().into_builder().schema();
        metadata_info(&query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let (_, session) = self.session(request.metadata())?;
        let tables = self.backend.tables(&session).await?;
        let mut builder = query.into_builder();
        for (name, schema) in tables {
            builder
                .append(CATALOG, DB_SCHEMA, name, "TABLE", &flight_schema(&schema))
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        let schema = builder.schema();
        let batch = builder
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = Schema::new(vec![Field::new("table_type", DataType::Utf8, false)]);
        metadata_info(&query.as_any(), &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "table_type",
            DataType::Utf8,
            false,
        )]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(arrow::array::StringArray::from(vec!["TABLE"]))],
        )
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(stream_batches(schema, vec![batch])?))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

fn metadata_info(
    cmd: &Any,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    // The command itself is the ticket: DoGet dispatches it to the matching `do_get_*`.
    let info = FlightInfo::new()
        .try_with_schema(&flight_schema(schema))
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(cmd.encode_to_vec())))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// The whole service: JSON tickets on `DoGet`, everything else to Flight SQL.
pub struct FlightService<B: FlightBackend> {
    sql: Arc<SqlService<B>>,
}

impl<B: FlightBackend> std::fmt::Debug for FlightService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightService").finish_non_exhaustive()
    }
}

impl<B: FlightBackend> Clone for FlightService<B> {
    fn clone(&self) -> Self {
        FlightService {
            sql: Arc::clone(&self.sql),
        }
    }
}

impl<B: FlightBackend> FlightService<B> {
    /// The service over `backend`.
    pub fn new(backend: Arc<B>) -> FlightService<B> {
        FlightService {
            sql: Arc::new(SqlService::new(backend)),
        }
    }
}

#[tonic::async_trait]
impl<B: FlightBackend> FlightServiceTrait for FlightService<B> {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<arrow_flight::FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightServiceTrait::handshake(self.sql.as_ref(), request).await
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        FlightServiceTrait::list_flights(self.sql.as_ref(), request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        FlightServiceTrait::get_flight_info(self.sql.as_ref(), request).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        FlightServiceTrait::poll_flight_info(self.sql.as_ref(), request).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        FlightServiceTrait::get_schema(self.sql.as_ref(), request).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        // A JSON insight query starts with `{`; protobuf tickets of Flight SQL never do.
        if request.get_ref().ticket.first() == Some(&b'{') {
            return self.sql.insight(request).await;
        }
        FlightServiceTrait::do_get(self.sql.as_ref(), request).await
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        FlightServiceTrait::do_put(self.sql.as_ref(), request).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        FlightServiceTrait::do_exchange(self.sql.as_ref(), request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        FlightServiceTrait::do_action(self.sql.as_ref(), request).await
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightServiceTrait::list_actions(self.sql.as_ref(), request).await
    }
}

/// Serves Flight on `listener` until `shutdown` resolves.
pub async fn serve<B: FlightBackend>(
    backend: Arc<B>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let service = FlightServiceServer::new(FlightService::new(backend))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Without TCP_NODELAY a small answer waits for the client's delayed ACK (~40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
