//! The rows of the table and the table itself, printed at the end and written to
//! `target/bench-report.md`.

/// One row of the table.
pub struct Row {
    measure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
}

/// A row: what was measured, its value, the baseline it is compared with, the ratio to it (`–`
/// when none) and the target.
pub fn row(measure: &str, value: String, baseline: &str, ratio: Option<f64>, target: &str) -> Row {
    Row {
        measure: measure.into(),
        value,
        baseline: baseline.into(),
        ratio: ratio
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "–".into()),
        target: target.into(),
    }
}

/// Prints the table (the machine, the run's settings, then the rows) and writes it to
/// `target/bench-report.md`.
pub fn print(
    rows: &[Row],
    cores: usize,
    version: &str,
    connections: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let (c, s) = (connections, seconds);
    let mut table = format!(
        "Machine: {cores} cores; {version}\nConcurrency {c}; timed runs of {s} s.\n\n| measure | value | baseline | ratio | target |\n|---|---|---|---|---|\n"
    );
    for r in rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.measure, r.value, r.baseline, r.ratio, r.target
        ));
    }
    println!("{table}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-report.md", &table)?;
    Ok(())
}
