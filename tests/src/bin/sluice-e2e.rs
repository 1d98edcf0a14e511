//! The `sluice-api` program, built inside this package so the end-to-end tests always run the
//! code of this very build (cargo builds a package's binaries before its integration tests).

fn main() -> std::process::ExitCode {
    sluice_api::main()
}
