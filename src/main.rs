//! The `fluoropose` binary: command-line dispatch (the library holds everything).

use clap::Parser;

fn main() -> std::process::ExitCode {
    tune_allocator();
    // candle asks for its thread count on every matrix product and, without RAYON_NUM_THREADS,
    // counts physical cores by reading /proc/cpuinfo each time; on Linux that read interrupts
    // every CPU (to sample its clock), which cost about a fifth of a training step on 2 cores.
    // Saying the number once avoids it; it is the number rayon uses anyway.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the first statement of main: no other thread exists to read the environment.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string())
        };
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = fluoropose::cli::Cli::parse();
    match fluoropose::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc hands allocations over its mmap threshold (128 KiB at first) straight to the kernel and
/// unmaps them when freed, so every U-Net layer's buffers were mapped, zero-filled page by page
/// and unmapped again on every frame and training step (page faults, and TLB shootdowns that
/// interrupt the other cores). Serving buffers up to 32 MiB from the heap and keeping freed
/// memory for reuse cut a training step by ~20% and a forward pass by ~15% on 2 cores.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
