//! The `account-projector` command line: [`cli`] parses it, [`commands`] runs it.

#![forbid(unsafe_code)]

mod cli;
mod commands;

use std::process::ExitCode;

use account_projector::telemetry;
use clap::Parser;

// Requests allocate many small short-lived buffers (rows, bodies, JSON); mimalloc serves them
// faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    telemetry::init(cli.log_format);
    tracing::debug!(?cli, "command line"); // its Debug shows no secret
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", one_sentence(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes in one line, without the repetitions of errors that quote their source.
fn one_sentence(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = vec![];
    for cause in error.chain() {
        let text = cause.to_string();
        if !parts
            .last()
            .is_some_and(|previous| previous.contains(&text))
        {
            parts.push(text);
        }
    }
    parts.join(": ")
}
