//! `sluice-api` entry point: everything is in [`sluice_api::main`].

fn main() -> std::process::ExitCode {
    sluice_api::main()
}
