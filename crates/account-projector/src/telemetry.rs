//! Tracing setup: `RUST_LOG` filters (default `info`), `LOG_FORMAT` picks `pretty` or `json`.

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Installs the global subscriber; a second call is a no-op rather than a panic.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// The process's Prometheus recorder, installed on first use (once per process, however many
/// applications a test builds). `None` if another recorder was installed first.
pub fn prometheus() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let sizes = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("append_batch_size".into()), &sizes)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("projector_batch_events".into()), &sizes)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("snapshot_read_batch_size".into()),
                        &sizes,
                    )
                })
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let upkeep = handle.clone();
                runtime.spawn(async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        upkeep.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "webhooks_total",
        "Webhook requests by outcome: accepted, duplicate, or the problem code"
    );
    describe_histogram!(
        "append_duration_seconds",
        "Time to append and commit one group of deliveries"
    );
    describe_histogram!("append_batch_size", "Deliveries sharing one commit");
    describe_gauge!(
        "log_head_position",
        "Highest position known in the event log"
    );
    describe_gauge!(
        "projector_checkpoint_position",
        "Position the projection has folded up to"
    );
    describe_gauge!("projector_lag_events", "Events appended but not yet folded");
    describe_gauge!(
        "projector_lag_seconds",
        "Age of the newest folded event when its batch committed"
    );
    describe_histogram!("projector_batch_events", "Events per projector batch");
    describe_histogram!(
        "snapshot_read_batch_size",
        "Current-snapshot lookups of the query API sharing one read"
    );
    describe_counter!(
        "snapshot_writes_total",
        "Snapshot rows written by the projector"
    );
    describe_counter!(
        "quarantined_events_total",
        "Events the fold refused and quarantined"
    );
    describe_gauge!(
        "projector_leader",
        "1 while this process is the writing projector"
    );
    describe_counter!(
        "enrichment_fetches_total",
        "Account fetches from Argyle's API by outcome: fetched, not_found, failed"
    );
    describe_gauge!(
        "enrichment_pending",
        "Accounts waiting to be fetched from Argyle's API"
    );
}

/// Prometheus text exposition of the metrics listed in the README.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format 0.0.4",
        body = String, content_type = "text/plain"))
)]
pub async fn metrics() -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    let body = prometheus()
        .map(|handle| handle.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
