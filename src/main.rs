//! The `aiq` binary. All of it lives in the library; see `aiq::cli`.

/// mimalloc instead of glibc's malloc: with thousands of jobs in flight on a multi-threaded
/// runtime, glibc's arenas cost a quarter of the CPU (lock waits, consolidation) and hold on to
/// fragmented memory. See ARCHITECTURE.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    aiq::cli::main()
}
