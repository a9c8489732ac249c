//! `prismctl query`: a JSON insight query or SQL, answered over Arrow Flight and printed as a
//! table (or JSON rows).

use crate::admin::Endpoints;
use crate::output::Output;
use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use futures::TryStreamExt;
use std::path::PathBuf;

/// Flags of `prismctl query`.
#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The JSON insight query (see the query format in the docs), or `-` to read it from stdin.
    #[arg(conflicts_with_all = ["file", "sql"])]
    query: Option<String>,
    /// Read the JSON insight query from this file.
    #[arg(long, conflicts_with = "sql")]
    file: Option<PathBuf>,
    /// Run this SQL (Flight SQL) over the project's `events` and `persons` tables instead.
    #[arg(long)]
    sql: Option<String>,
    /// The project's API token (secret; printed by `prism up`).
    #[arg(long, env = "OPTIPRISM_API_TOKEN", hide_env_values = true)]
    token: String,
}

/// Runs the query on the Flight endpoint of the first node that answers.
pub(crate) async fn run(
    endpoints: &Endpoints,
    args: QueryArgs,
    output: Output,
) -> anyhow::Result<()> {
    let (_, status) = endpoints.first_status().await?;
    let me = status["node"].as_u64();
    let flight = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"].as_u64() == me)
        .and_then(|m| m["flight"].as_str())
        .context("the node did not say where its Flight endpoint is")?
        .to_string();
    let channel = tonic::transport::Channel::from_shared(format!("http://{flight}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach Flight at {flight}"))?;
    let batches = match (&args.sql, &args.file, &args.query) {
        (Some(sql), _, _) => sql_batches(channel, &args.token, sql).await?,
        (None, Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            insight_batches(channel, &args.token, &text).await?
        }
        (None, None, Some(q)) if q == "-" => {
            let text = std::io::read_to_string(std::io::stdin())?;
            insight_batches(channel, &args.token, &text).await?
        }
        (None, None, Some(q)) => insight_batches(channel, &args.token, q).await?,
        (None, None, None) => bail!("give a JSON query, --file or --sql"),
    };
    print_batches(&batches, output)
}

fn status_message(e: arrow_flight::error::FlightError) -> anyhow::Error {
    match e {
        arrow_flight::error::FlightError::Tonic(status) => {
            anyhow::anyhow!("{} ({:?})", status.message(), status.code())
        }
        other => anyhow::anyhow!("{other}"),
    }
}

async fn insight_batches(
    channel: tonic::transport::Channel,
    token: &str,
    query: &str,
) -> anyhow::Result<Vec<RecordBatch>> {
    let parsed: serde_json::Value =
        serde_json::from_str(query).context("the query is not valid JSON")?;
    let inner = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    let mut client = arrow_flight::FlightClient::new_from_inner(inner);
    client.add_header("authorization", &format!("Bearer {token}"))?;
    let stream = client
        .do_get(arrow_flight::Ticket::new(serde_json::to_vec(&parsed)?))
        .await
        .map_err(status_message)?;
    stream.try_collect().await.map_err(status_message)
}

async fn sql_batches(
    channel: tonic::transport::Channel,
    token: &str,
    sql: &str,
) -> anyhow::Result<Vec<RecordBatch>> {
    let mut client = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    client.set_token(token.to_string());
    let info = client
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.context("an endpoint without a ticket")?;
        let batches: Vec<RecordBatch> = client
            .do_get(ticket)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .try_collect()
            .await
            .map_err(status_message)?;
        out.extend(batches);
    }
    Ok(out)
}

fn print_batches(batches: &[RecordBatch], output: Output) -> anyhow::Result<()> {
    match output {
        Output::Table => println!("{}", arrow::util::pretty::pretty_format_batches(batches)?),
        Output::Json => {
            let mut writer = arrow::json::ArrayWriter::new(std::io::stdout());
            for b in batches {
                writer.write(b)?;
            }
            writer.finish()?;
            println!();
        }
    }
    Ok(())
}
