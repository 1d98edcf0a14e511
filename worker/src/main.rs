//! `sluice-worker` entry point: flags, logging, run. The program lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = sluice_worker::cli::Cli::parse();
    sluice_worker::init_logging();
    sluice_worker::start(cli.args)
}
