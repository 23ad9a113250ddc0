//! The `fluoropose` binary: command-line dispatch (the library holds everything).

use clap::Parser;

fn main() -> std::process::ExitCode {
    fluoropose::tune_allocator();
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
            eprintln!("error: {}", fluoropose::cli::report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
