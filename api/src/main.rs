//! `sluice-api` entry point: everything is in [`sluice_api::main`].

/// mimalloc: fewer instructions per proxied request than glibc's malloc (measured with
/// `bench/instructions`), in the API and in the worker (`sluice-api worker`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice_api::main()
}
