//! The paper's method end to end on tiny data: dataset generation (labels, resume), training
//! (the loss falls; checkpoints reload exactly; resume; divergence is reported and not
//! written), PEL fine-tuning through the registration layer, and evaluation.
#![allow(clippy::unwrap_used)]

use candle_core::Device;
use fluoropose::dataset::{Dataset, Request, Split, generate, parse_subjects};
use fluoropose::model::{ModelConfig, Predictor, UNet, Views};
use fluoropose::task::Task;
use fluoropose::train::{Mode, TrainError, TrainOptions, train};
use std::path::Path;

fn request(size: usize, views: usize) -> Request {
    Request {
        subjects: parse_subjects("phantom:1..3", 1).unwrap(),
        views,
        novel_views: 2,
        size,
        seed: 7,
        range: Default::default(),
        realism: Default::default(),
        cpu: true,
    }
}

fn tiny(size: usize) -> ModelConfig {
    ModelConfig {
        depth: 3,
        base_channels: 4,
        input_size: size,
        ..ModelConfig::default()
    }
}

fn options(out: &Path, mode: Mode, steps: usize) -> TrainOptions {
    TrainOptions {
        mode,
        epochs: 50,
        batch: 4,
        lr: 1e-2,
        max_steps: Some(steps),
        out: out.to_path_buf(),
        config: tiny(32),
        ..TrainOptions::default()
    }
}

#[test]
fn dataset_labels_splits_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(32, 3);
    let n = generate(&req, dir.path(), &Task::new()).unwrap();
    // 2 training subjects x (3 + 2 novel views) + 1 held-out subject x 3.
    assert_eq!(n, 13);
    let ds = Dataset::open(dir.path()).unwrap();
    assert_eq!(ds.split(Some(Split::Train)).len(), 6);
    assert_eq!(ds.split(Some(Split::NovelView)).len(), 4);
    assert_eq!(ds.split(Some(Split::NovelSubject)).len(), 3);
    // Labels are the projections of the subject's 3D landmarks at the stored pose.
    for s in &ds.samples {
        let subj = &ds.manifest.subjects[s.subject];
        for (i, p) in subj.all3d().unwrap().iter().enumerate() {
            let uv = ds.manifest.camera.project(&s.pose(), p);
            assert!((uv.x - s.projected[i].unwrap()[0]).abs() < 1e-9);
            if let Some([x, y]) = s.landmarks[i] {
                assert!((0.0..32.0).contains(&(x + 0.5)) && (0.0..32.0).contains(&(y + 0.5)));
            }
        }
        assert_eq!(ds.image(s).unwrap().len(), 32 * 32);
    }
    // Resume: a cut-off label line and a lost image are re-rendered, nothing else.
    let labels = dir.path().join("labels.jsonl");
    let text = std::fs::read_to_string(&labels).unwrap();
    let cut = &text[..text.len() - 40];
    std::fs::write(&labels, cut).unwrap();
    assert_eq!(generate(&req, dir.path(), &Task::new()).unwrap(), 1);
    assert_eq!(Dataset::open(dir.path()).unwrap().samples.len(), 13);
    assert_eq!(generate(&req, dir.path(), &Task::new()).unwrap(), 0);
    // Asking for something else in the same folder is refused.
    let mut other = request(32, 3);
    other.seed = 8;
    let e = generate(&other, dir.path(), &Task::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("different dataset"), "{e}");
    // Cancelled work stops with an error and keeps what was written.
    let d2 = tempfile::tempdir().unwrap();
    let t = Task::new();
    t.cancel();
    assert!(generate(&req, d2.path(), &t).is_err());
}

#[test]
fn training_lowers_the_loss_checkpoints_reload_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    generate(&request(32, 4), &dir.path().join("d"), &Task::new()).unwrap();
    let ds = Dataset::open(&dir.path().join("d")).unwrap();
    let out = dir.path().join("m.safetensors");
    let mut losses = Vec::new();
    let s = train(
        std::slice::from_ref(&ds),
        &options(&out, Mode::Baseline, 40),
        &Device::Cpu,
        &Task::new(),
        &mut |m| losses.push(m.loss),
    )
    .unwrap();
    assert_eq!(s.steps, 40);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    // The metrics log has one line per step.
    let log = std::fs::read_to_string(dir.path().join("m.metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 40);
    // The checkpoint reloads to identical outputs, and its card says how it was made.
    let net = UNet::load(&out, &Device::Cpu).unwrap();
    let p1 = Predictor::new(&net).unwrap();
    let p2 = Predictor::load(&out, &Device::Cpu).unwrap();
    let img = ds.image(&ds.samples[0]).unwrap();
    assert_eq!(
        p1.predict(&img, 32, 32).unwrap(),
        p2.predict(&img, 32, 32).unwrap()
    );
    assert_eq!(net.config.card["training"]["mode"], "baseline");
    // Resume: the state file says 40 steps; asking for 10 more continues from there.
    let mut more = options(&out, Mode::Baseline, 50);
    more.max_steps = Some(50);
    let s2 = train(
        std::slice::from_ref(&ds),
        &more,
        &Device::Cpu,
        &Task::new(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s2.steps, 50);
}

#[test]
fn several_datasets_train_together_and_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    generate(&request(32, 3), &a, &Task::new()).unwrap();
    let mut other = request(32, 2);
    other.seed = 9;
    generate(&other, &b, &Task::new()).unwrap();
    let both = [Dataset::open(&a).unwrap(), Dataset::open(&b).unwrap()];
    // 2 training subjects x 3 views + 2 x 2: one epoch at batch 4 is 3 steps, not 2.
    let out = dir.path().join("m.safetensors");
    let mut o = options(&out, Mode::Baseline, 100);
    o.epochs = 1;
    let s = train(&both, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap();
    assert_eq!(s.steps, 3);
    let card = &UNet::load(&out, &Device::Cpu).unwrap().config.card["training"];
    assert_eq!(card["images"], 10);
    assert!(card["data"].as_str().unwrap().contains(" + "), "{card}");
    // The pose loss solves a batch with one camera: datasets with two are refused, by name.
    let mut moved = both.clone();
    moved[1].manifest.camera.sdd_mm = 900.0;
    let mut ft = options(&dir.path().join("ft.safetensors"), Mode::Finetune, 1);
    ft.init = Some(out.clone());
    let e = train(&moved, &ft, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("one camera"), "{e}");
    // A dataset of another image size is named in the error.
    let small = dir.path().join("small");
    generate(&request(16, 2), &small, &Task::new()).unwrap();
    let mixed = [both[0].clone(), Dataset::open(&small).unwrap()];
    let e = train(&mixed, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("small"), "{e}");
    assert!(train(&[], &o, &Device::Cpu, &Task::new(), &mut |_| {}).is_err());
}

#[test]
fn a_widened_network_trains_on_from_where_the_narrow_one_was() {
    let dir = tempfile::tempdir().unwrap();
    generate(&request(32, 4), &dir.path().join("d"), &Task::new()).unwrap();
    let ds = [Dataset::open(&dir.path().join("d")).unwrap()];
    let narrow = dir.path().join("narrow.safetensors");
    train(
        &ds,
        &options(&narrow, Mode::Baseline, 20),
        &Device::Cpu,
        &Task::new(),
        &mut |_| {},
    )
    .unwrap();
    // One more step of the narrow network and of its widened copy: the same batch through the
    // same function gives the same loss (a fresh 6-channel network would not).
    let first_loss = |widen: Option<usize>, name: &str| {
        let mut o = options(&dir.path().join(name), Mode::Baseline, 1);
        o.init = Some(narrow.clone());
        o.widen = widen;
        let mut loss = f64::NAN;
        train(&ds, &o, &Device::Cpu, &Task::new(), &mut |m| loss = m.loss).unwrap();
        loss
    };
    let (a, b) = (
        first_loss(None, "a.safetensors"),
        first_loss(Some(6), "b.safetensors"),
    );
    assert!((a - b).abs() < 1e-5 * a.abs(), "narrow {a}, widened {b}");
    let wide = UNet::load(&dir.path().join("b.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(wide.config.base_channels, 6);
    assert_eq!(wide.config.card["training"]["widen"], 6);
    // And it learns: the loss keeps falling over 20 more steps.
    let mut o = options(&dir.path().join("c.safetensors"), Mode::Baseline, 20);
    o.init = Some(narrow.clone());
    o.widen = Some(6);
    let mut losses = Vec::new();
    train(&ds, &o, &Device::Cpu, &Task::new(), &mut |m| {
        losses.push(m.loss)
    })
    .unwrap();
    let (head, tail) = (
        losses[..5].iter().sum::<f64>(),
        losses[15..].iter().sum::<f64>(),
    );
    assert!(tail < head, "loss {head} -> {tail} (sums of 5 steps)");
    // Widening needs a network to widen.
    let mut fresh = options(&dir.path().join("e.safetensors"), Mode::Baseline, 1);
    fresh.widen = Some(6);
    let e = train(&ds, &fresh, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("--init"), "{e}");
}

/// Every tensor of `a` within `tol` of `expect`'s, by name.
fn assert_tensors_close(
    a: &UNet,
    expect: &std::collections::HashMap<String, Vec<f32>>,
    tol: f32,
    what: &str,
) {
    let got = a.tensors();
    assert_eq!(got.len(), expect.len(), "{what}");
    for (name, t) in got {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let e = &expect[&name];
        let worst = v
            .iter()
            .zip(e)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tol, "{what}: {name} off by {worst}");
    }
}

fn values(net: &UNet) -> std::collections::HashMap<String, Vec<f32>> {
    net.tensors()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn the_weights_moving_average_is_kept_checkpointed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    generate(&request(32, 4), &dir.path().join("d"), &Task::new()).unwrap();
    let ds = [Dataset::open(&dir.path().join("d")).unwrap()];
    let init = dir.path().join("init.safetensors");
    train(
        &ds,
        &options(&init, Mode::Baseline, 5),
        &Device::Cpu,
        &Task::new(),
        &mut |_| {},
    )
    .unwrap();
    let w0 = values(&UNet::load(&init, &Device::Cpu).unwrap());
    // One step with decay d: the average is d w0 + (1 - d) w1, every tensor (batch-norm
    // statistics too), where w1 is the checkpoint the step wrote.
    let d = 0.75f32;
    let out = dir.path().join("m.safetensors");
    let mut o = options(&out, Mode::Baseline, 1);
    o.init = Some(init.clone());
    o.ema = Some(f64::from(d));
    train(&ds, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap();
    let avg_path = fluoropose::train::ema_path(&out);
    assert_eq!(avg_path, dir.path().join("m.ema.safetensors"));
    let w1 = values(&UNet::load(&out, &Device::Cpu).unwrap());
    let avg1 = UNet::load(&avg_path, &Device::Cpu).unwrap();
    assert_eq!(avg1.config.card["training"]["averaged"], true);
    assert_eq!(avg1.config.card["training"]["ema"], f64::from(d));
    let blend = |a: &std::collections::HashMap<String, Vec<f32>>,
                 b: &std::collections::HashMap<String, Vec<f32>>| {
        a.iter()
            .map(|(k, x)| {
                let y = &b[k];
                let v = x
                    .iter()
                    .zip(y)
                    .map(|(x, y)| d * x + (1.0 - d) * y)
                    .collect();
                (k.clone(), v)
            })
            .collect::<std::collections::HashMap<_, Vec<f32>>>()
    };
    assert_tensors_close(&avg1, &blend(&w0, &w1), 1e-5, "after one step");
    // The step moved the weights, so the average is neither end.
    let moved = w0
        .iter()
        .any(|(k, x)| x.iter().zip(&w1[k]).any(|(a, b)| (a - b).abs() > 1e-4));
    assert!(moved, "the step did not change the weights");
    // Resumed for one more step, it continues the saved average (not a fresh one at w1).
    let avg1v = values(&avg1);
    let stale = dir.path().join("stale");
    std::fs::create_dir(&stale).unwrap();
    for f in ["m.ema.safetensors", "m.ema.json"] {
        std::fs::copy(dir.path().join(f), stale.join(f)).unwrap();
    }
    o.max_steps = Some(2);
    train(&ds, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap();
    let w2 = values(&UNet::load(&out, &Device::Cpu).unwrap());
    let avg2 = UNet::load(&avg_path, &Device::Cpu).unwrap();
    assert_tensors_close(&avg2, &blend(&avg1v, &w2), 1e-5, "after resuming");
    // An average that is not from the step being resumed (here step 1's, put back as if a
    // crash had lost the later one) is not continued: the average starts again at w2.
    for f in ["m.ema.safetensors", "m.ema.json"] {
        std::fs::copy(stale.join(f), dir.path().join(f)).unwrap();
    }
    o.max_steps = Some(3);
    train(&ds, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap();
    let w3 = values(&UNet::load(&out, &Device::Cpu).unwrap());
    let avg3 = UNet::load(&avg_path, &Device::Cpu).unwrap();
    assert_tensors_close(&avg3, &blend(&w2, &w3), 1e-5, "after a stale average");
    // A decay outside (0, 1) is refused before anything is trained.
    o.ema = Some(1.0);
    o.out = dir.path().join("bad.safetensors");
    let e = train(&ds, &o, &Device::Cpu, &Task::new(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("EMA decay"), "{e}");
    assert!(!o.out.exists());
}

#[test]
fn divergence_is_reported_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    generate(&request(32, 2), &dir.path().join("d"), &Task::new()).unwrap();
    let ds = Dataset::open(&dir.path().join("d")).unwrap();
    let out = dir.path().join("div.safetensors");
    let mut o = options(&out, Mode::Baseline, 20);
    // A loss that grows past the threshold at all is "divergence" here: any second step does.
    o.lr = 10.0;
    o.divergence_factor = 1.0 + 1e-9;
    let mut prev = f64::NAN;
    let mut grew = false;
    let r = train(
        std::slice::from_ref(&ds),
        &o,
        &Device::Cpu,
        &Task::new(),
        &mut |m| {
            grew |= m.loss > prev;
            prev = m.loss;
        },
    );
    let div_step = match r {
        Err(TrainError::Diverged { step, .. }) => step,
        other => panic!(
            "expected divergence (grew: {grew}), got {:?}",
            other.map(|s| s.steps)
        ),
    };
    assert!(div_step >= 1, "the first step sets the reference");
    // Only whole epochs before the divergence may have been checkpointed, never the diverged state.
    if out.exists() {
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("div.state.json")).unwrap(),
        )
        .unwrap();
        assert!(st["steps_done"].as_u64().unwrap() <= div_step as u64);
        let net = UNet::load(&out, &Device::Cpu).unwrap();
        for (name, t) in net.tensors() {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
        }
    }
}

#[test]
fn pel_finetuning_runs_through_the_registration_layer_and_evaluation_reports() {
    let dir = tempfile::tempdir().unwrap();
    generate(&request(32, 4), &dir.path().join("d"), &Task::new()).unwrap();
    let ds = Dataset::open(&dir.path().join("d")).unwrap();
    let base = dir.path().join("base.safetensors");
    train(
        std::slice::from_ref(&ds),
        &options(&base, Mode::Baseline, 5),
        &Device::Cpu,
        &Task::new(),
        &mut |_| {},
    )
    .unwrap();
    // Fine-tuning needs a starting point.
    let ft = dir.path().join("ft.safetensors");
    let e = train(
        std::slice::from_ref(&ds),
        &options(&ft, Mode::Finetune, 2),
        &Device::Cpu,
        &Task::new(),
        &mut |_| {},
    );
    assert!(matches!(e, Err(TrainError::Invalid(_))));
    let mut o = options(&ft, Mode::Finetune, 3);
    o.init = Some(base.clone());
    o.lr = 1e-4;
    o.divergence_factor = 1e6;
    let mut pose_losses = Vec::new();
    train(
        std::slice::from_ref(&ds),
        &o,
        &Device::Cpu,
        &Task::new(),
        &mut |m| pose_losses.push(m.pose_loss),
    )
    .unwrap();
    assert_eq!(pose_losses.len(), 3);
    assert!(pose_losses.iter().all(|l| l.is_finite() && *l >= 0.0));
    // The fine-tuned weights differ from the baseline's: the PEL gradient reached the network.
    let a = UNet::load(&base, &Device::Cpu).unwrap().tensors();
    let b = UNet::load(&ft, &Device::Cpu).unwrap().tensors();
    let w = "enc0.0.conv.weight";
    let diff = (&a[w] - &b[w])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 0.0);
    // Evaluation: every image of the split, RMSE per landmark, pose errors.
    let net = UNet::load(&ft, &Device::Cpu).unwrap();
    let r = fluoropose::eval::evaluate(&net, &ds, Some(Split::NovelSubject), &Task::new()).unwrap();
    assert_eq!(r.images, 4);
    assert!(r.rmse_px["mean"].as_f64().unwrap().is_finite());
    assert_eq!(r.rmse_px.len(), 9);
    let md = fluoropose::eval::markdown(&[("ft".into(), r)]);
    assert!(md.contains("| ft | novel-subject | 4 |"));
}

/// The oracle of `eval --oracle-noise-px`: exact landmarks register to the true pose; noisy ones
/// score the RMSE their noise implies and a registration error that grows with it.
#[test]
fn the_oracle_scores_its_noise_and_exact_landmarks_register_exactly() {
    use fluoropose::eval::{Landmarks, evaluate_landmarks};
    let dir = tempfile::tempdir().unwrap();
    generate(&request(64, 6), dir.path(), &Task::new()).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let score = |sigma_px: f64| {
        evaluate_landmarks(
            &Landmarks::Oracle { sigma_px, seed: 1 },
            &ds,
            None,
            &Task::new(),
        )
        .unwrap()
    };
    let exact = score(0.0);
    assert_eq!(exact.images, ds.samples.len());
    assert_eq!(exact.registration_failures, 0);
    assert!(exact.rmse_px["mean"].as_f64().unwrap() < 1e-9);
    assert!(exact.tre_mm < 1e-3, "TRE {} mm", exact.tre_mm);
    assert!(exact.rotation_error_deg < 1e-3);
    assert!(exact.pose_rmse_px < 1e-6, "{}", exact.pose_rmse_px);
    let (a, b) = (score(2.0), score(8.0));
    let ra = a.rmse_px["mean"].as_f64().unwrap();
    // The pose fits 6 parameters to 16 coordinates, so the CT's landmarks projected at it keep
    // about sqrt(6/16) = 0.61 of independent noise.
    assert!(
        a.pose_rmse_px > 0.3 * ra && a.pose_rmse_px < 0.85 * ra,
        "{} against {ra}",
        a.pose_rmse_px
    );
    let rb = b.rmse_px["mean"].as_f64().unwrap();
    // The errors by angle from AP partition the images and the landmarks: their squared errors
    // add up to the whole set's.
    assert!(b.by_angle.len() > 1, "{:?}", b.by_angle);
    assert_eq!(b.by_angle.iter().map(|g| g.images).sum::<usize>(), b.images);
    let n: usize = b.by_angle.iter().map(|g| g.errors.landmarks).sum();
    let sq: f64 = b
        .by_angle
        .iter()
        .map(|g| g.errors.rmse_px.powi(2) * g.errors.landmarks as f64)
        .sum();
    assert!(
        ((sq / n as f64).sqrt() - rb).abs() < 1e-9,
        "{:?}",
        b.by_angle
    );
    for g in &b.by_angle {
        let angles: Vec<f64> = ds
            .samples
            .iter()
            .map(|s| fluoropose::geometry::sampling::angle_from_ap_rad(&s.pose()).to_degrees())
            .filter(|a| *a >= g.deg[0] && *a < g.deg[1])
            .collect();
        assert_eq!(angles.len(), g.images, "{g:?}");
    }
    // RMSE of 2D Gaussian noise is sigma * sqrt 2 (about 60 points here: within 25%).
    assert!((ra / (2.0 * 2f64.sqrt()) - 1.0).abs() < 0.25, "{ra}");
    assert!((rb / (8.0 * 2f64.sqrt()) - 1.0).abs() < 0.25, "{rb}");
    assert!(
        a.tre_mm > 0.1 && b.tre_mm > 2.0 * a.tre_mm,
        "{} {}",
        a.tre_mm,
        b.tre_mm
    );
    // The misses' breakdown: none for exact landmarks; with coarse noise (a radial miss over
    // 20 px for about a quarter of them) the hits' and the misses' squared errors make up the
    // mean's, and without heatmaps nobody says whether a peak was near.
    assert_eq!((exact.miss_rate, exact.miss_error_share), (0.0, 0.0));
    assert!(exact.misses_with_peak_rate.is_none());
    let c = score(12.0);
    let rc = c.rmse_px["mean"].as_f64().unwrap();
    assert!(c.miss_rate > 0.05 && c.miss_rate < 0.6, "{}", c.miss_rate);
    assert!(c.rmse_hits_px < fluoropose::eval::MISS_PX && c.rmse_hits_px < rc);
    assert!(c.miss_error_share > c.miss_rate && c.miss_error_share < 1.0);
    let split = c.rmse_hits_px.powi(2) * (1.0 - c.miss_rate) / (1.0 - c.miss_error_share);
    assert!(
        (split - rc * rc).abs() < 1e-6 * rc * rc,
        "{split} against {}",
        rc * rc
    );
    assert!(c.misses_with_peak_rate.is_none());
    let nan = Landmarks::Oracle {
        sigma_px: f64::NAN,
        seed: 0,
    };
    assert!(evaluate_landmarks(&nan, &ds, None, &Task::new()).is_err());
}

/// A CT that does not hold every landmark (a scan that ends above the symphysis, like the real
/// one beside the project) still makes a dataset: the missing ones are labelled absent in every
/// image, evaluation scores the others and says "-" for them, the pose loss refuses it with the
/// reason, and a CT with fewer than 3 is refused.
#[test]
fn a_ct_lacking_landmarks_makes_a_dataset_that_labels_them_absent() {
    use fluoropose::eval::{Landmarks, evaluate_landmarks, markdown};
    let dir = tempfile::tempdir().unwrap();
    let (vol, lm) = fluoropose::volume::phantom::phantom_subject(5, Some(4.0));
    let ct = dir.path().join("cropped.nii.gz");
    fluoropose::volume::write_nifti(&vol, &ct).unwrap();
    // The inferior foramina and the inferior symphysis are below this scan.
    let mut partial = lm.clone();
    for i in [1, 4, 6] {
        partial.points[i] = None;
    }
    partial.write(&dir.path().join("cropped.mrk.json")).unwrap();
    let data = dir.path().join("ds");
    let req = Request {
        subjects: parse_subjects(ct.to_str().unwrap(), 0).unwrap(),
        views: 6,
        novel_views: 0,
        ..request(64, 6)
    };
    generate(&req, &data, &Task::new()).unwrap();
    let ds = Dataset::open(&data).unwrap();
    let subject = &ds.manifest.subjects[0];
    assert_eq!(subject.present3d().len(), 5);
    assert!(subject.all3d().is_none());
    // Poses are drawn around the landmarks the CT holds.
    let c = fluoropose::registration::intensity::centroid(&partial.present());
    assert!((nalgebra::Point3::from(subject.isocenter) - c).norm() < 1e-9);
    for s in &ds.samples {
        for i in 0..8 {
            let missing = [1, 4, 6].contains(&i);
            assert_eq!(s.projected[i].is_none(), missing, "{i}");
            if missing {
                assert!(s.landmarks[i].is_none());
            }
        }
    }
    let exact = evaluate_landmarks(
        &Landmarks::Oracle {
            sigma_px: 0.0,
            seed: 1,
        },
        &ds,
        None,
        &Task::new(),
    )
    .unwrap();
    // The five it holds register the pose exactly; the three it lacks have nothing to score.
    assert_eq!(exact.registration_failures, 0);
    assert!(exact.tre_mm < 1e-3, "{}", exact.tre_mm);
    assert!(exact.rmse_px["L1"].as_f64().unwrap() < 1e-9);
    assert!(exact.rmse_px["L2"].is_null(), "{:?}", exact.rmse_px);
    let table = markdown(&[("oracle".into(), exact)]);
    let row = table.lines().nth(2).unwrap();
    assert_eq!(row.split('|').nth(6).unwrap().trim(), "-", "{row}");
    // The pose loss needs all 8 in 3D.
    let out = dir.path().join("pel.safetensors");
    let mut o = options(&out, Mode::Composite, 2);
    o.config = tiny(64);
    let err = train(&[ds], &o, &Device::Cpu, &Task::new(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("all 8 landmarks"), "{err}");
    // Two placed are not enough to make a dataset of.
    let mut two = lm;
    for i in 2..8 {
        two.points[i] = None;
    }
    two.write(&dir.path().join("cropped.mrk.json")).unwrap();
    let req = Request {
        subjects: parse_subjects(ct.to_str().unwrap(), 0).unwrap(),
        ..req
    };
    let err = generate(&req, &dir.path().join("ds2"), &Task::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 of the 8 landmarks placed"), "{err}");
}

/// Landmarks of a known error register to a pose that is off mostly along the beam; refining it
/// against each image with the subject's CT brings it to the true pose, on the GPU when one
/// works and on the CPU reference alike, and the report says what it did.
#[test]
fn eval_refines_the_landmark_poses_against_the_images() {
    use fluoropose::eval::{EvalOptions, Landmarks, evaluate_with};
    use fluoropose::registration::intensity::IntensityOptions;
    let dir = tempfile::tempdir().unwrap();
    generate(&request(128, 2), dir.path(), &Task::new()).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let noisy = Landmarks::Oracle {
        sigma_px: 3.0,
        seed: 3,
    };
    for cpu in [true, false] {
        let opts = EvalOptions {
            refine: Some(IntensityOptions::default()),
            cpu,
            limit: Some(3),
            per_image: true,
            ..EvalOptions::default()
        };
        let r = evaluate_with(&noisy, &ds, None, &opts, &Task::new()).unwrap();
        assert_eq!(r.images, 3);
        let f = r.refined.clone().unwrap();
        assert_eq!(f.images, 3 - r.registration_failures);
        assert!((f.tre_before_mm - r.tre_mm).abs() < 1e-9);
        assert!(
            f.tre_mm < 0.5 * f.tre_before_mm,
            "{} -> {} mm",
            f.tre_before_mm,
            f.tre_mm
        );
        assert!(f.rmse_px < r.rmse_px["mean"].as_f64().unwrap());
        assert!(f.renders_per_image > 10.0);
        // Image by image: the same numbers, each refined pose's similarity no worse.
        assert_eq!(r.per_image.len(), 3);
        // Each image's points, and the CT's at its landmark pose, come with it.
        for i in &r.per_image {
            assert_eq!(i.points.len(), 8, "{i:?}");
            assert_eq!(i.pose_points.len(), if i.tre_mm.is_some() { 8 } else { 0 });
        }
        let refined: Vec<_> = r.per_image.iter().filter_map(|i| i.refined).collect();
        assert_eq!(refined.len(), f.images);
        let mean = refined.iter().map(|i| i.tre_mm).sum::<f64>() / refined.len() as f64;
        assert!((mean - f.tre_mm).abs() < 1e-9);
        assert!(refined.iter().all(|i| i.similarity[1] >= i.similarity[0]));
        if cpu {
            assert_eq!(f.renderer, "cpu");
        }
        // The tables carry the refined TRE as one more column.
        let rows = [("oracle".to_string(), r.clone())];
        let md = fluoropose::eval::markdown(&rows);
        assert!(md.contains("| TRE refined mm |"), "{md}");
        assert!(md.contains(&format!(" {:.2} |\n", f.tre_mm)), "{md}");
        let csv = fluoropose::eval::csv(&rows);
        assert!(csv.lines().next().unwrap().ends_with(",tre_refined_mm"));
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with(&format!(",{:.4}", f.tre_mm))
        );
    }
    // Without the options there is no refined report and no per-image list.
    let plain = evaluate_with(&noisy, &ds, None, &EvalOptions::default(), &Task::new()).unwrap();
    assert!(plain.refined.is_none() && plain.per_image.is_empty());
    let md = fluoropose::eval::markdown(&[("plain".to_string(), plain)]);
    assert!(!md.contains("refined"), "{md}");
}

/// The shipped model on a phantom it never saw, read three ways: the paper's argmax, and the
/// app's decoding (mirror-averaged heatmaps, pose-consistent peaks). Every way finds the
/// landmarks to a few pixels and a pose; the app's decoding registers every image and says
/// which landmarks it reprojected.
#[test]
fn the_shipped_model_decoded_the_apps_way_finds_a_held_out_phantom() {
    use fluoropose::detect::{Decode, detect};
    use fluoropose::eval::{Landmarks, evaluate_landmarks};
    if !fluoropose::model::shipped::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let req = Request {
        subjects: parse_subjects("phantom:61..62", 1).unwrap(),
        views: 4,
        novel_views: 0,
        size: 256,
        seed: 11,
        range: fluoropose::geometry::sampling::PoseRange {
            max_rotation_rad: 20f64.to_radians(),
            ..Default::default()
        },
        realism: Default::default(),
        cpu: true,
    };
    generate(&req, dir.path(), &Task::new()).unwrap();
    let ds = Dataset::open(dir.path()).unwrap();
    let net = fluoropose::model::shipped::network(&Device::Cpu).unwrap();
    let score = |from: &Landmarks<'_>| {
        let r = evaluate_landmarks(from, &ds, Some(Split::NovelSubject), &Task::new()).unwrap();
        assert_eq!(r.images, 4);
        assert_eq!(r.registration_failures, 0);
        r
    };
    // No novel views were made: evaluating them is an error, not a row of zeros.
    let e = evaluate_landmarks(
        &Landmarks::Model(&net),
        &ds,
        Some(Split::NovelView),
        &Task::new(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("no images in the novel-view split"),
        "{e}"
    );
    let plain = score(&Landmarks::Model(&net));
    let app = score(&Landmarks::Decoded(&net, Decode::recommended()));
    let mirrored = score(&Landmarks::Decoded(
        &net,
        Decode {
            views: Views::MIRROR,
            consensus: None,
            ..Decode::default()
        },
    ));
    let shifted = score(&Landmarks::Decoded(
        &net,
        Decode {
            views: Views {
                mirror: false,
                shift_px: Views::SHIFT_PX,
                zoom_pct: 0,
                denoise: false,
            },
            consensus: None,
            ..Decode::default()
        },
    ));
    // The same images inverted (bone dark) are read inverted, to the same landmarks; read as
    // stored they are lost.
    let dark = |decode: Decode| {
        fluoropose::eval::evaluate_with(
            &Landmarks::Decoded(&net, decode),
            &ds,
            Some(Split::NovelSubject),
            &fluoropose::eval::EvalOptions {
                dark: true,
                ..Default::default()
            },
            &Task::new(),
        )
        .unwrap()
    };
    let auto = dark(Decode::recommended());
    assert_eq!((auto.inverted_rate, app.inverted_rate), (1.0, 0.0));
    assert_eq!(auto.rmse_px["mean"], app.rmse_px["mean"]);
    let blind = dark(Decode {
        polarity: fluoropose::detect::Polarity::AsIs,
        ..Decode::recommended()
    });
    assert!(blind.inverted_rate == 0.0 && blind.rmse_px["mean"].as_f64().unwrap() > 50.0);
    // Every decoding with misses says how many of them its heatmaps had a peak near; read
    // bone-dark, the network sees hardly a landmark, so few of its many misses had one.
    for r in [&plain, &app, &mirrored, &shifted, &auto, &blind] {
        assert_eq!(
            r.misses_with_peak_rate.is_some(),
            r.miss_rate > 0.0,
            "{r:?}"
        );
    }
    assert!(blind.miss_rate > 0.5, "{}", blind.miss_rate);
    assert!(
        blind.misses_with_peak_rate.is_some_and(|p| p < 0.25),
        "{blind:?}"
    );
    for r in [&plain, &app, &mirrored, &shifted] {
        let rmse = r.rmse_px["mean"].as_f64().unwrap();
        assert!(rmse < 12.0, "{rmse} px at 512");
        assert!(r.tre_mm < 30.0, "TRE {} mm", r.tre_mm);
    }
    // Only the pose-consistent decoding takes other peaks or reprojects, and on these easy views
    // it keeps nearly every strongest peak.
    assert_eq!(plain.reprojected_rate + plain.other_peak_rate, 0.0);
    assert_eq!(mirrored.reprojected_rate + mirrored.other_peak_rate, 0.0);
    assert!(app.reprojected_rate + app.other_peak_rate < 0.25, "{app:?}");
    // Landmarks at the pose: the same pose (and TRE), the points where the CT's project, so
    // they score as the CT's landmarks at the landmark pose do.
    let registered = score(&Landmarks::Decoded(
        &net,
        Decode {
            consensus: Some(fluoropose::registration::consensus::ConsensusOptions {
                snap: true,
                ..Default::default()
            }),
            ..Decode::recommended()
        },
    ));
    assert_eq!(registered.tre_mm, app.tre_mm);
    let r = registered.rmse_px["mean"].as_f64().unwrap();
    assert!((r - registered.pose_rmse_px).abs() < 1e-6, "{registered:?}");
    assert_ne!(registered.rmse_px["mean"], app.rmse_px["mean"]);
    // The mirror-averaged heatmaps are other heatmaps: their points differ from the argmax's.
    assert_ne!(
        plain.rmse_subpixel_px, mirrored.rmse_subpixel_px,
        "mirroring changed nothing"
    );
    // So are the shift-averaged ones, and each shifted view is mapped back onto the frame: a
    // view moved the wrong way would put two of the three opinions 34 px off (68 at 512).
    assert_ne!(plain.rmse_subpixel_px, shifted.rmse_subpixel_px);
    assert!(
        (shifted.rmse_subpixel_px - plain.rmse_subpixel_px).abs() < 3.0,
        "shifted {} px, plain {} px",
        shifted.rmse_subpixel_px,
        plain.rmse_subpixel_px
    );
    // The pipeline's entry point on one image: 8 landmarks in frame pixels and a pose.
    let p = Predictor::new(&net).unwrap();
    let s = &ds.split(Some(Split::NovelSubject))[0];
    let img = ds.image(s).unwrap();
    let p3 = ds.manifest.subjects[s.subject].points3d();
    let found = detect(
        &p,
        &img,
        256,
        256,
        &ds.manifest.camera,
        Some(&p3),
        None,
        &Decode::recommended(),
    )
    .unwrap();
    assert_eq!(found.detections.len(), 8);
    assert!(!found.inverted, "a DRR is read as stored");
    let sol = found.solution.as_ref().expect("a pose");
    assert!(sol.status.ok());
    for (d, t) in found.detections.iter().zip(&s.landmarks) {
        if let (Some([x, y]), false) = (t, d.reprojected) {
            let e = ((d.point.x - x).powi(2) + (d.point.y - y).powi(2)).sqrt();
            assert!(e < 10.0, "{e} px at 256 from the truth");
        }
    }

    // The same frame with bone dark, as fluoroscopy often shows it. Read as stored, the network
    // finds nothing; the automatic polarity reads it inverted, which is the frame above, and
    // finds the same landmarks; a stream whose last frame was dark starts there.
    use fluoropose::detect::Polarity;
    let dark: Vec<f32> = img.iter().map(|v| 1.0 - v).collect();
    let run = |pixels: &[f32], decode: Decode| {
        detect(
            &p,
            pixels,
            256,
            256,
            &ds.manifest.camera,
            Some(&p3),
            None,
            &decode,
        )
        .unwrap()
    };
    let blind = run(
        &dark,
        Decode {
            polarity: Polarity::AsIs,
            ..Decode::recommended()
        },
    );
    assert!(
        blind.mean_confidence() < 0.2 && found.mean_confidence() > 0.6,
        "confidence {} on the dark frame read as stored, {} on the bright one",
        blind.mean_confidence(),
        found.mean_confidence()
    );
    for first in [false, true] {
        let auto = run(
            &dark,
            Decode {
                inverted_first: first,
                ..Decode::recommended()
            },
        );
        assert!(auto.inverted);
        for (a, b) in auto.detections.iter().zip(&found.detections) {
            assert!((a.point - b.point).norm() < 0.05, "{a:?} vs {b:?}");
        }
    }
    // Told the frame is inverted when it is not, the reading is as blind; automatic is not.
    let told = run(
        &img,
        Decode {
            polarity: Polarity::Inverted,
            ..Decode::recommended()
        },
    );
    assert!(told.inverted && told.mean_confidence() < 0.2);
    let auto = run(
        &img,
        Decode {
            inverted_first: true,
            ..Decode::recommended()
        },
    );
    assert!(!auto.inverted);
}

/// At a fluoroscopic dose (1,000 photons per pixel, a tenth of the training data's) the shipped
/// network reads frames better smoothed first; at the training data's dose nothing is smoothed
/// and the reading is the same.
#[test]
fn the_shipped_model_reads_low_dose_frames_better_smoothed() {
    use fluoropose::detect::Decode;
    use fluoropose::eval::{Landmarks, evaluate_landmarks};
    if !fluoropose::model::shipped::available() {
        return;
    }
    let net = fluoropose::model::shipped::network(&Device::Cpu).unwrap();
    let read = |photons: f64, denoise: bool| {
        let dir = tempfile::tempdir().unwrap();
        let req = Request {
            subjects: parse_subjects("phantom:61..62", 1).unwrap(),
            views: 6,
            novel_views: 0,
            size: 256,
            seed: 5,
            range: Default::default(),
            realism: fluoropose::dataset::Realism {
                photons,
                blur_px: 0.5,
                gamma: 0.3,
                ..Default::default()
            },
            cpu: true,
        };
        generate(&req, dir.path(), &Task::new()).unwrap();
        let ds = Dataset::open(dir.path()).unwrap();
        let decode = Decode {
            views: Views {
                denoise,
                ..Views::PLAIN
            },
            consensus: None,
            ..Decode::default()
        };
        let r =
            evaluate_landmarks(&Landmarks::Decoded(&net, decode), &ds, None, &Task::new()).unwrap();
        assert_eq!(r.images, 12);
        (
            r.rmse_px["mean"].as_f64().unwrap(),
            r.input_noise
                .expect("a network's reading reports the noise"),
        )
    };
    let ((raw, n_raw), (smoothed, n_low)) = (read(1000.0, false), read(1000.0, true));
    assert!(
        smoothed < 0.95 * raw,
        "1,000 photons: {raw:.2} px raw, {smoothed:.2} smoothed"
    );
    // The report says how noisy the set was and how much of it was smoothed: the same images
    // either way, smoothed only when asked.
    assert_eq!(n_raw.mean, n_low.mean);
    assert_eq!(n_raw.smoothed_rate, 0.0);
    let above = fluoropose::model::noise::SMOOTH_ABOVE as f64;
    assert!(
        n_low.median > above && n_low.smoothed_rate > 0.5,
        "{n_low:?}"
    );
    assert!(n_low.min <= n_low.median && n_low.median <= n_low.max);
    // At the training data's dose few frames are smoothed at all (those of little contrast,
    // where the noise is large against it), and the reading is as good.
    let ((raw, _), (smoothed, n_high)) = (read(10_000.0, false), read(10_000.0, true));
    assert!(
        smoothed < 1.1 * raw,
        "10,000 photons: {raw:.2} px raw, {smoothed:.2} smoothed"
    );
    assert!(n_high.mean < 0.5 * n_low.mean, "{n_high:?} {n_low:?}");
    assert!(n_high.smoothed_rate < 0.5, "{n_high:?}");
}
