//! `ferroserve`: parse, dispatch, exit.

use std::io::Write;

use clap::Parser;
use ferroserve::args::{Cli, Command, Role};
use ferroserve::commands::{self, servers};
use ferroserve::running::{Running, shutdown_signal};

/// Prints the bound address on stdout (scripts and tests read it), then serves until a signal.
async fn announce_and_run(what: &str, running: Running) -> anyhow::Result<()> {
    // A closed stdout (a supervisor that stopped reading) must not take the server down.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ferroserve {what} listening on {}", running.addr);
    if let Some(m) = running.metrics_addr {
        let _ = writeln!(out, "ferroserve {what} metrics on http://{m}/metrics");
    }
    if let Some(h) = running.http_addr {
        let _ = writeln!(out, "ferroserve {what} OpenAI API on http://{h}/v1");
    }
    running.run_until(shutdown_signal).await?;
    tracing::info!("{what} stopped cleanly");
    Ok(())
}

/// `--check-config`: the settings were read and validated; says which file, for an init container's log.
fn config_checked(what: &str, args: &ferroserve::args::ServerArgs) -> anyhow::Result<()> {
    let file = args.config.as_ref().map_or_else(
        || "configs/ferroserve.toml (default)".to_string(),
        |p| p.display().to_string(),
    );
    println!("ferroserve {what}: config OK: {file}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ferroserve_telemetry::init_logging();
    match cli.command {
        Command::Serve(a) => {
            let settings = a.reloadable_settings(Role::Router, &[])?;
            if a.check_config {
                return config_checked("serve", &a);
            }
            let model = commands::resolve_model(&settings, &ferroserve::Bars::default())?;
            announce_and_run("serve", servers::start_serve(settings, model).await?).await
        }
        Command::Worker(a) => {
            let settings = a.server.settings(Role::Worker, &[])?;
            if a.server.check_config {
                return config_checked("worker", &a.server);
            }
            let model = if a.mock {
                servers::WorkerModel::Mock {
                    per_token: std::time::Duration::from_micros(a.mock_token_us),
                }
            } else {
                servers::WorkerModel::File(commands::resolve_model(&settings, &ferroserve::Bars::default())?)
            };
            announce_and_run("worker", servers::start_worker(settings, model).await?).await
        }
        Command::Router(a) => {
            let settings = a.server.reloadable_settings(Role::Router, &a.workers)?;
            if a.server.check_config {
                return config_checked("router", &a.server);
            }
            announce_and_run("router", servers::start_router(settings).await?).await
        }
        Command::Generate(a) => commands::generate::run(a).await,
        Command::FetchModel(a) => commands::fetch_model(a.cache_dir),
        Command::Limits(a) => commands::admin::limits(a).await,
        Command::Reload(a) => commands::admin::reload(a).await,
        Command::Filter(a) => commands::filter::run(a).await,
        Command::Model(a) => commands::model::run(a),
        Command::Models(a) => commands::models::run(a).await,
        Command::Bench(a) => commands::bench::run(a).await,
        Command::Plan(a) => commands::plan::run(a),
    }
}
