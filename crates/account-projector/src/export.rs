//! `account-projector export`: the audit export, one NDJSON line per event in log order.

use futures_util::TryStreamExt;
use ingest::Secrets;
use serde::Serialize;
use store::PgPool;
use store::keys::{Opened, Vault};
use store::log::{EventRecord, ExportFilter};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use uuid::Uuid;

/// One exported line. `body` is the request body exactly as received, as a JSON string: hashing or
/// signing its decoded bytes reproduces `body_sha256` and the signature. An erased event has
/// `erased: true` and no `body`; its sha256 and signature stay as evidence of what was received.
#[derive(Serialize)]
struct Line<'a> {
    position: i64,
    received_at: chrono::DateTime<chrono::Utc>,
    event: &'a str,
    account_id: Option<Uuid>,
    user_id: Option<Uuid>,
    deliveries: i64,
    body_sha256: String,
    erased: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    /// Why the stored body cannot be read (altered in the table); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<&'a str>,
    signature: Option<&'a str>,
    /// The signature checked now against the configured secrets; `null` when none are configured
    /// or the body cannot be read.
    signature_valid: Option<bool>,
}

/// Streams every event matching `filter` to `out`, returning how many lines were written.
/// Memory stays constant however many events there are.
pub async fn export(
    pool: &PgPool,
    vault: &Vault,
    filter: ExportFilter,
    secrets: &Secrets,
    out: impl AsyncWrite + Unpin,
) -> anyhow::Result<u64> {
    let mut out = BufWriter::new(out);
    let mut conn = pool.acquire().await?;
    let mut rows = store::log::export(&mut conn, vault, filter);
    let mut written = 0;
    let mut line = Vec::with_capacity(4096);
    while let Some(record) = rows.try_next().await? {
        line.clear();
        write_line(&record, secrets, &mut line)?;
        out.write_all(&line).await?;
        written += 1;
    }
    out.flush().await?;
    Ok(written)
}

fn write_line(record: &EventRecord, secrets: &Secrets, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    let (plain, unreadable) = match &record.body {
        Opened::Plain(body) => (Some(body.as_slice()), None),
        Opened::Erased => (None, None),
        Opened::Unreadable(reason) => (None, Some(reason.as_str())),
    };
    // Ingest accepted only bodies that parsed as JSON, which is UTF-8.
    let body = plain.map(std::str::from_utf8).transpose()?;
    let line = Line {
        position: record.position,
        received_at: record.received_at,
        event: &record.event,
        account_id: record.account_id,
        user_id: record.user_id,
        deliveries: record.deliveries,
        body_sha256: hex::encode(&record.body_sha256),
        erased: record.body == Opened::Erased,
        body,
        unreadable,
        signature: record.signature.as_deref(),
        signature_valid: plain
            .filter(|_| !secrets.is_empty())
            .map(|body| secrets.verify(body, record.signature.as_deref().map(str::as_bytes))),
    };
    serde_json::to_writer(&mut *buffer, &line)?;
    buffer.push(b'\n');
    Ok(())
}
