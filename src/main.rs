//! The `aiq` binary. All of it lives in the library; see `aiq::cli`.

fn main() -> std::process::ExitCode {
    aiq::cli::main()
}
