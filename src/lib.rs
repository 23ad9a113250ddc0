//! fluoropose: real-time pelvic fluoroscopy.
//!
//! A U-Net finds the 8 pelvic landmarks of Mo, Suh et al. ("Enhanced Landmark Detection Model in
//! Pelvic Fluoroscopy using 2D/3D Registration Loss") on each X-ray frame; landmark-based 2D/3D
//! registration (paper eqs. 4-8) recovers the C-arm pose; a DRR of the CT at that pose verifies it.
//!
//! The one flow: `frame source -> model -> landmarks 2D -> registration -> pose -> DRR -> overlay`.
//! Modules are named for the domain and depend only on modules above them in this list:
//! [`io`], [`volume`], [`landmarks`], [`geometry`], [`drr`], [`registration`], then the CLI.
//!
//! Conventions: world = patient LPS millimetres; pixels have their origin at the top-left corner
//! of the top-left pixel (x right, y down); poses are camera_from_world with a Rodrigues rotation
//! vector (radians) and a translation (mm). Units sit in names where they could be doubted
//! (`_mm`, `_px`, `_rad`, `_hu`). See `docs/geometry.md`.

pub mod app;
pub mod bench;
pub mod cli;
pub mod dataset;
pub mod detect;
pub mod drr;
pub mod eval;
pub mod geometry;
pub mod io;
pub mod landmarks;
pub mod model;
pub mod registration;
pub mod stream;
pub mod task;
pub mod train;
pub mod volume;

/// glibc hands allocations over its mmap threshold (128 KiB at first) straight to the kernel and
/// unmaps them when freed, so every U-Net layer's buffers were mapped, zero-filled page by page
/// and unmapped again on every frame and training step (page faults, and TLB shootdowns that
/// interrupt the other cores). Serving buffers from the heap and keeping freed memory for reuse
/// cut a training step by ~20% and a forward pass by ~15% on 2 cores. The threshold cannot go
/// above 32 MiB, and a training batch's activations are larger (16 x 12 channels at 256² is
/// 50 MB), so mmap is switched off altogether: a batch-16 step of the default network then took
/// 2.3-2.5 s against 2.9-3.2 s, and `train --batch 16` 6.0-6.4 images/s against 4.4-4.6. Freed
/// memory stays with the process for reuse, which is what a stream of same-sized frames or steps
/// wants; the price is resident memory after one-off large work (the 512x512x133 chest CT
/// loaded and rendered: 770 MB against 560 MB; `malloc_trim` after the read did not lower it).
/// The binary calls this first; benchmarks and examples call it too, so that they measure what
/// the app runs.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters (glibc serialises it with allocation).
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Lowers the calling thread's scheduling priority (nice 10), and so that of the threads it
/// starts afterwards (a GPU driver's workers among them): background work such as the live
/// view's pose refinement then takes only the CPU time the frame pipeline leaves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn lower_thread_priority() {
    // SAFETY: setpriority takes plain integers; on Linux `who = 0` is the calling thread.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if r != 0 {
        log::debug!("setpriority: {}", std::io::Error::last_os_error());
    }
}

/// Elsewhere threads keep their priority.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn lower_thread_priority() {}

/// See the Linux version: other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}
