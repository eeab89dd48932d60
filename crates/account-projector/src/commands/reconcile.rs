//! `reconcile [--dry-run] [--account ID] [--user ID]`: compare Argyle's list of accounts with the
//! log and append what it lacks ([`enricher::reconcile`]).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use enricher::reconcile::{self, Observer, Report, Request};
use indicatif::{ProgressBar, ProgressStyle};
use store::reconcile::{Counts, Scope};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cli::{ReconcileArgs, defaults};

/// Exit status when removals were asked for and the missing-share guard refused them.
const REFUSED: u8 = 3;
/// Exit status when a signal stopped the run (it resumes on the next one).
const STOPPED: u8 = 130;

pub(crate) async fn run(database_url: &str, args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let Some(api) = args.argyle.api()? else {
        anyhow::bail!(
            "set ARGYLE_API_KEY_ID and ARGYLE_API_KEY_SECRET (Argyle console: Developers > API keys)"
        );
    };
    let client = api.client()?.with_retry(reconcile::RETRY);
    let vault = args.keys.vault()?;
    let pool = super::batch_pool(database_url).await?;
    // A session of its own, closed at the end: it holds the reconcile lock while it runs.
    let mut conn = pool.acquire().await.map_err(store::Error::from)?.detach();
    let shutdown = CancellationToken::new();
    super::serve::stop_on_signal(shutdown.clone())
        .context("could not install the signal handlers")?;
    let mut config = defaults().enricher.reconcile;
    config.rate = args.rate;
    config.max_missing_share = args.max_missing_share;
    let request = Request {
        scope: Scope {
            user: args.user,
            account: args.account,
        },
        dry_run: args.dry_run,
        confirm_removals: args.confirm_removals,
        force: args.force,
        started_by: "cli",
    };
    let observer = Printer::new();
    let report = reconcile::run(
        &mut conn, &vault, &client, &config, request, &observer, &shutdown,
    )
    .await;
    observer.finish();
    let report = report?;
    print_summary(&report, &config);
    let _ = store::close(conn).await;
    Ok(if report.interrupted {
        eprintln!(
            "reconcile: stopped after page {}; run it again to resume from there",
            report.pages
        );
        ExitCode::from(STOPPED)
    } else if report.refused {
        eprintln!(
            "reconcile: removals refused: {} of {} accounts held as active ({:.0}%) are not listed \
             by Argyle, more than --max-missing-share {}; check that ARGYLE_API_URL and the API key \
             are those of the environment whose webhooks this service receives, then pass --force \
             if the removals are real",
            report.missing,
            report.held_active,
            report.missing_share() * 100.0,
            config.max_missing_share
        );
        ExitCode::from(REFUSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The summary on stdout, one `name: value` line each, after the missing accounts' lines.
fn print_summary(report: &Report, config: &reconcile::ReconcileConfig) {
    let c = &report.counts;
    if report.dry_run {
        println!("dry run: nothing appended");
    }
    if let Some(page) = report.resumed_from_page {
        println!("resumed: run {} after page {page}", report.run_id);
    }
    println!("pages: {}", report.pages);
    println!("listed: {}", c.listed);
    println!("new: {}", c.new);
    println!("newer at Argyle: {}", c.newer_at_argyle);
    println!("unchanged: {}", c.unchanged);
    println!("newer here: {}", c.newer_here);
    if c.removed_here > 0 {
        println!("removed here: {}", c.removed_here);
    }
    if c.unreadable > 0 {
        println!("unreadable: {}", c.unreadable);
    }
    if report.interrupted {
        return;
    }
    println!(
        "missing at Argyle: {} of {} held as active",
        report.missing, report.held_active
    );
    if report.removals > 0 {
        let verb = if report.dry_run {
            "removals to confirm"
        } else {
            "removals confirmed"
        };
        println!("{verb}: {}", report.removals);
    }
    if report.missing > 0 && report.missing_share() > config.max_missing_share {
        eprintln!(
            "reconcile: warning: {:.0}% of the accounts held as active are not listed by Argyle; \
             an API key or ARGYLE_API_URL of another environment looks like this",
            report.missing_share() * 100.0
        );
    }
}

/// A spinner with the counts on a terminal, a log line every five seconds otherwise; each
/// missing account as a line on stdout as soon as it is known.
struct Printer {
    bar: Option<ProgressBar>,
    logged: Mutex<Instant>,
}

impl Printer {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} reconcile {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            logged: Mutex::new(Instant::now()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Printer {
    fn page(&self, pages: i32, c: &Counts) {
        let line = format!(
            "page {pages}: listed {}, new {}, newer at Argyle {}, unchanged {}, newer here {}",
            c.listed, c.new, c.newer_at_argyle, c.unchanged, c.newer_here
        );
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => {
                let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
                if logged.elapsed() >= Duration::from_secs(5) {
                    *logged = Instant::now();
                    tracing::info!("reconcile progress: {line}");
                }
            }
        }
    }

    fn missing(&self, account: Uuid, user: Uuid) {
        let line = format!("missing at Argyle: {account} (user {user})");
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    fn removed(&self, account: Uuid) {
        let line = format!("removal confirmed: {account}");
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }
}
