//! `sluice-worker` entry point: flags, logging, run. The program lives in the library.

use clap::Parser;

/// mimalloc, as in `sluice-api` (which also runs workers): fewer instructions per proxied
/// request than glibc's malloc (`bench/instructions`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = sluice_worker::cli::Cli::parse();
    sluice_worker::init_logging();
    sluice_worker::start(cli.args)
}
