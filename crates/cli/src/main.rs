//! The `imgstream` binary: parses the command line and runs one command.

mod commands;
mod export;
#[cfg(test)]
mod export_multi_conn;
mod qmp_client;
mod size;
mod usage;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IMGSTREAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let cli = match commands::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => match usage::report(&error, &args) {
            usage::Report::ClapOutput => error.exit(),
            usage::Report::Usage(lines) => {
                for line in lines {
                    eprintln!("{line}");
                }
                return ExitCode::from(usage::USAGE_EXIT_CODE);
            }
        },
    };
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("imgstream: {error:#}");
            ExitCode::from(1)
        }
    }
}
