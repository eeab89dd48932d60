//! Progress of long work: a bar with events/s and ETA on a terminal, log lines otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use projector::rebuild::Progress;

/// Picks a bar when stderr is a terminal and periodic log lines when it is not.
pub fn for_stderr(what: &'static str) -> Box<dyn Progress + Send + Sync> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar(ProgressBar::hidden(), what))
    } else {
        Box::new(LogLines {
            what,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }
}

struct Bar(ProgressBar, &'static str);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.0.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.0.set_message(self.1);
    }
    fn advance(&self, events: u64) {
        self.0.inc(events);
    }
    fn finish(&self) {
        self.0.finish();
    }
}

/// Logs a line every five seconds, and at start and end.
struct LogLines {
    what: &'static str,
    total: AtomicU64,
    done: AtomicU64,
    last: Mutex<Option<(Instant, Instant)>>,
}

const EVERY: Duration = Duration::from_secs(5);

impl Progress for LogLines {
    fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        let now = Instant::now();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, now));
        tracing::info!(total, "{} started", self.what);
    }
    fn advance(&self, events: u64) {
        let done = self.done.fetch_add(events, Ordering::Relaxed) + events;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((started, logged)) = last.as_mut()
            && logged.elapsed() >= EVERY
        {
            *logged = Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let total = self.total.load(Ordering::Relaxed);
            let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
            tracing::info!(
                done,
                total,
                events_per_sec = rate.round() as u64,
                eta_secs = eta.round() as u64,
                "{} progress",
                self.what
            );
        }
    }
    fn finish(&self) {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = last
            .map(|(started, _)| started.elapsed())
            .unwrap_or_default();
        let done = self.done.load(Ordering::Relaxed);
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
        tracing::info!(
            done,
            elapsed_ms = elapsed.as_millis() as u64,
            events_per_sec = rate.round() as u64,
            "{} folded the log",
            self.what
        );
    }
}
