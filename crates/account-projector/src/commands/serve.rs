//! `serve`: run the roles until SIGTERM or ctrl-c.

use std::process::ExitCode;

use account_projector::{Application, Settings};
use anyhow::Context;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(settings: Settings) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone()).context("could not install the signal handlers")?;
    let app = Application::build(settings).await?;
    app.run_until_stopped(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Fires `shutdown` on SIGTERM or ctrl-c (SIGINT). The handlers are installed before this returns,
/// so before the listener is bound: a signal that finds the service listening always stops it
/// gracefully, never by the signal's default action (an immediate exit that would drop the
/// requests in flight).
pub(crate) fn stop_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    #[cfg(unix)]
    let stopped = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
    };
    #[cfg(not(unix))]
    let stopped = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::spawn(async move {
        stopped.await;
        tracing::info!("shutdown requested: finishing in-flight work");
        shutdown.cancel();
    });
    Ok(())
}
