//! Criterion benchmark: DRR rendering of the phantom at 256 px, GPU (whatever adapter wgpu finds:
//! lavapipe here) and the CPU reference. `fluoropose bench drr` gives the full table.

use criterion::{Criterion, criterion_group, criterion_main};
use fluoropose::drr::cpu::{self, Renderer};
use fluoropose::drr::gpu::{DrrRenderer, headless_device};
use fluoropose::drr::{Attenuation, DensityVolume};
use fluoropose::geometry::Camera;
use fluoropose::geometry::sampling::ap_pose;
use fluoropose::volume::phantom::phantom_subject;
use std::hint::black_box;
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let (vol, _) = phantom_subject(0, Some(2.0));
    let dv = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let cam = Camera::paper(256);
    let pose = ap_pose(&vol.center_mm(), 800.0);
    let mut g = c.benchmark_group("drr_phantom_256");
    g.sample_size(10);
    if let Ok((device, queue, _)) = headless_device(false) {
        let mut r = DrrRenderer::new(&device, &queue);
        if r.set_volume(dv.clone()).is_ok() {
            g.bench_function("gpu_siddon", |b| {
                b.iter(|| black_box(r.render(&cam, &[pose], Renderer::Siddon { full_line: false })))
            });
            g.bench_function("gpu_trilinear_1mm", |b| {
                b.iter(|| {
                    black_box(r.render(
                        &cam,
                        &[pose],
                        Renderer::TrilinearStep {
                            step_mm: 1.0,
                            full_line: false,
                        },
                    ))
                })
            });
        }
    }
    g.bench_function("cpu_siddon", |b| {
        b.iter(|| {
            black_box(cpu::render(
                &dv,
                &cam,
                &pose,
                Renderer::Siddon { full_line: false },
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
