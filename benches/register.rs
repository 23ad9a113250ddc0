//! Criterion benchmark: one 8-landmark registration per solver (see also `fluoropose bench register`).

use criterion::{Criterion, criterion_group, criterion_main};
use fluoropose::geometry::Camera;
use fluoropose::geometry::sampling::PoseRange;
use fluoropose::registration::{LmOptions, Problem, paper, solve};
use fluoropose::volume::phantom::{Phantom, PhantomParams};
use nalgebra::{Point2, Point3};
use rand::SeedableRng;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let cam = Camera::paper(512);
    let Some(pts) = Phantom::new(&PhantomParams::subject(3)).landmarks.all() else {
        return;
    };
    let iso = pts.iter().fold(Point3::origin(), |a, p| a + p.coords / 8.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let truth = PoseRange::default().sample(&mut rng, &iso);
    let l: Vec<Option<Point2<f64>>> = pts
        .iter()
        .map(|p| Some(cam.project(&truth, p) + nalgebra::Vector2::new(1.3, -0.7)))
        .collect();
    let pb = Problem {
        camera: &cam,
        points3d: &pts,
        points2d: &l,
        weights: None,
    };
    let o = paper::PaperOptions::default();
    let mut g = c.benchmark_group("register_8_landmarks");
    g.bench_function("lm_production", |b| {
        b.iter(|| black_box(solve(black_box(&pb), &LmOptions::default())))
    });
    g.bench_function("adam_paper_f64", |b| {
        b.iter(|| black_box(paper::adam::<f64>(black_box(&pb), [0.0; 6], &o)))
    });
    g.bench_function("adam_paper_f32", |b| {
        b.iter(|| black_box(paper::adam::<f32>(black_box(&pb), [0.0; 6], &o)))
    });
    g.bench_function("lbfgs_paper_f64", |b| {
        b.iter(|| black_box(paper::lbfgs::<f64>(black_box(&pb), [0.0; 6], &o)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
