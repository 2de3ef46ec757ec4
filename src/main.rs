//! The `shard-sd` binary: parses the command line, installs logging and runs the
//! sidecar (or a subcommand). Exit codes: 0 after a clean shutdown, 1 on a
//! runtime failure, 2 on invalid configuration.

use std::process::ExitCode;

use clap::Parser;
use shard_sd::app::{self, RunError};
use shard_sd::config::{Cli, Command};
use shard_sd::{plan, probe, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    shard_sd::tune_allocator();
    // clap prints the error, naming the variable and accepted values, and exits 2.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match &cli.command {
        Some(Command::Probe { url }) => {
            return match runtime.block_on(probe::probe(url)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{err}");
                    ExitCode::from(1)
                }
            };
        }
        Some(Command::Plan {
            targets,
            slots,
            to_slots,
            json,
        }) => {
            let to = to_slots.unwrap_or(*slots);
            let params = cli.config.sharding_params();
            return match plan::report(targets, *slots, to, cli.config.shard_by, &params, *json) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }

    let config = cli.config;
    if let Err(err) = config.validate() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    telemetry::init_logging(config.log_format);
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        app::cancel_on_signal(shutdown.clone());
        app::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("error: {err}");
            let config_error = matches!(
                err,
                RunError::Config(_) | RunError::Aws(_) | RunError::Identity(_)
            );
            ExitCode::from(if config_error { 2 } else { 1 })
        }
    }
}
