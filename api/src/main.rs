//! `sluice-api` entry point: everything is in [`sluice_api::main`].

fn main() -> std::process::ExitCode {
    sluice_api::main()
}

/// jemalloc rather than the system allocator: the proxy allocates per request, per frame and
/// per stream; `bench/profile h2` with `COMPARE=` measured +24% HTTP/2 requests/s through
/// termination against glibc's malloc, for +3% memory per idle connection.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
