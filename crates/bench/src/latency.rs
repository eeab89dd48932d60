//! Ingest at a fixed 2,000/s against the service with every role: latency p50 / p99, and how much
//! of the machine the row had (on a virtual machine, host stalls show there first, as steal).

use std::sync::Arc;

use loadgen::{Workload, generate, send};

use crate::Args;
use crate::machine::CpuMark;
use crate::report::{Row, row};
use crate::server::sending;

/// Sends `2,000 × seconds` deliveries at 2,000/s to the server at `base`; the row.
pub async fn run(args: &Args, base: &str) -> Row {
    let s = args.seconds;
    let steady = Workload {
        accounts: (2000 * s as usize) / 27 + 1,
        seed: 2,
        ..Workload::default()
    };
    let deliveries = Arc::new(
        generate(&steady)
            .into_iter()
            .take(2000 * s as usize)
            .collect::<Vec<_>>(),
    );
    let mark = CpuMark::now();
    let fixed = send(deliveries, &sending(base, args.connections, Some(2000.0))).await;
    // How much of the machine the row had: when the host stalls a virtual machine, requests
    // queue meanwhile and the time shows here as steal.
    let shares = mark.shares().map_or_else(String::new, |s| {
        format!(
            " (machine busy {:.0}%, host steal {:.0}%, the load generator {:.0}%)",
            s.busy * 100.0,
            s.steal * 100.0,
            s.own.unwrap_or(0.0) * 100.0
        )
    });
    eprintln!("bench: ingest at 2,000/s: {}{shares}", fixed.summary());
    row(
        "ingest at 2,000/s: latency p50 / p99 (the machine's CPU during the row)",
        format!(
            "{:.1} / {:.1} ms{shares}",
            fixed.latency_ms(0.5),
            fixed.latency_ms(0.99)
        ),
        "",
        None,
        "p99 < 20 ms",
    )
}
