//! Intensity-based pose refinement: a frame rendered at a known pose, a starting pose off by the
//! landmark solver's typical error, and the refinement brings it back.

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::drr::cpu::Renderer;
use fluoropose::drr::{Attenuation, CpuDrr, DensityVolume, DrrSource};
use fluoropose::geometry::sampling::perturbed_pose;
use fluoropose::geometry::{Camera, Pose, rodrigues};
use fluoropose::registration::intensity::{
    IntensityError, IntensityOptions, Refinement, centroid, refine, refine_watched,
};
use fluoropose::registration::metrics::mean_tre_mm;
use fluoropose::stream::simulated::QuantumNoise;
use fluoropose::task::Task;
use nalgebra::{Point3, Vector3};
use rand::SeedableRng;
use std::sync::Arc;

struct Setup {
    source: CpuDrr,
    camera: Camera,
    truth: Pose,
    frame: Vec<f32>,
    points: Vec<Point3<f64>>,
}

/// A noisy 128x128 frame of phantom 61 (3 mm voxels) at a tilted, shifted pose.
fn setup() -> Setup {
    let (vol, lm) = fluoropose::volume::phantom::phantom_subject(61, Some(3.0));
    let points: Vec<_> = lm.all().unwrap().to_vec();
    let volume = Arc::new(DensityVolume::from_volume(&vol, Attenuation::default()));
    let mut source = CpuDrr {
        volume,
        renderer: Renderer::Siddon { full_line: false },
    };
    let camera = Camera::paper(128);
    let truth = perturbed_pose(
        &vol.center_mm(),
        800.0,
        &Vector3::new(0.2, -0.3, 0.1),
        &Vector3::new(10.0, -15.0, 20.0),
    );
    let clean = source.render(&camera, &truth).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let frame = QuantumNoise {
        photons_per_pixel: 3000.0,
    }
    .apply(&clean, &mut rng);
    Setup {
        source,
        camera,
        truth,
        frame,
        points,
    }
}

/// The similarity under which a run counts as ending unlike the frame in these tests: this frame
/// is noisier than the dataset's, and its own pose matches it to 0.83 only.
const BELOW: f64 = 0.8;

/// One run of the optimiser from the given start: no restarts, no scan of views.
fn one_run() -> IntensityOptions {
    IntensityOptions {
        restarts: Vec::new(),
        restart_below: BELOW,
        search: None,
        ..IntensityOptions::default()
    }
}

/// `pose` turned by `rot` about `pivot` and shifted by `shift` (camera axes).
fn off(pose: &Pose, pivot: &Point3<f64>, rot: Vector3<f64>, shift: Vector3<f64>) -> Pose {
    let c = pose.camera_from_world(pivot).coords;
    let turn = rodrigues(&rot);
    let t = turn * (pose.translation_mm - c) + c + shift;
    Pose::from_matrix(&(turn * pose.rotation_matrix()), t)
}

/// Where the landmark solver typically leaves the pose: tilted by a few degrees, a couple of
/// millimetres across the beam and 25 mm along it.
fn landmark_start(s: &Setup, pivot: &Point3<f64>) -> Pose {
    off(
        &s.truth,
        pivot,
        Vector3::new(0.03, -0.04, 0.01),
        Vector3::new(2.0, -1.5, 25.0),
    )
}

/// The truth turned upside down about the pivot and moved by `shift` (camera axes, mm): the pose
/// a few wrong landmarks give, no guide to the frame.
fn upside_down(s: &Setup, pivot: &Point3<f64>, shift: Vector3<f64>) -> Pose {
    off(
        &s.truth,
        pivot,
        Vector3::new(0.0, 0.0, 150f64.to_radians()),
        shift,
    )
}

/// A refinement that ended like the frame, at the pose (`tre_mm` from the truth).
fn assert_found(r: &Refinement, tre_mm: f64) {
    assert!(
        r.similarity >= BELOW && tre_mm < 3.0,
        "{r:?}, TRE {tre_mm} mm"
    );
}

#[test]
fn refinement_recovers_a_pose_the_landmarks_left_off_in_depth_and_tilt() {
    let mut s = setup();
    let pivot = centroid(&s.points);
    let opts = IntensityOptions::default();
    // The landmark solver's typical error: small across the image, large along the beam.
    for (rot, shift) in [
        (
            Vector3::new(0.03, -0.04, 0.01),
            Vector3::new(2.0, -1.5, 25.0),
        ),
        (
            Vector3::new(-0.02, 0.03, -0.02),
            Vector3::new(-3.0, 2.0, -15.0),
        ),
    ] {
        let init = off(&s.truth, &pivot, rot, shift);
        let tre0 = mean_tre_mm(&init, &s.truth, &s.points);
        assert!(tre0 > 10.0, "the start is off: {tre0} mm");
        let r = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
        let tre = mean_tre_mm(&r.pose, &s.truth, &s.points);
        println!(
            "TRE {tre0:.2} -> {tre:.2} mm, similarity {:.4} -> {:.4}, {} renders, {} steps",
            r.similarity_before, r.similarity, r.renders, r.steps
        );
        assert!(r.similarity > r.similarity_before);
        assert!(tre < 0.2 * tre0, "TRE {tre0:.2} -> {tre:.2} mm");
    }
}

/// A level stops once its steps no longer move the image (`converged_px`) instead of polishing
/// by hundredths of a pixel until the residual stops falling: far fewer DRRs, the same pose.
#[test]
fn a_level_stops_once_its_steps_no_longer_move_the_image() {
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = landmark_start(&s, &pivot);
    let mut run = |converged_px: f64| {
        let opts = IntensityOptions {
            converged_px,
            ..one_run()
        };
        let r = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
        (r, mean_tre_mm(&r.pose, &s.truth, &s.points))
    };
    let (exhaustive, tre_exhaustive) = run(0.0);
    let (default, tre_default) = run(IntensityOptions::default().converged_px);
    println!(
        "until the residual stops falling: {} DRRs, {} steps, TRE {tre_exhaustive:.3} mm; \
         default: {} DRRs, {} steps, TRE {tre_default:.3} mm",
        exhaustive.renders, exhaustive.steps, default.renders, default.steps
    );
    assert!(
        (default.renders as f64) < 0.75 * exhaustive.renders as f64,
        "{} DRRs against {}",
        default.renders,
        exhaustive.renders
    );
    assert!(default.steps < exhaustive.steps);
    // The pose is as good, from a start 25 mm off: this small noisy frame (3 mm voxels, 128 px)
    // leaves both about 2 mm from the truth, within a fifth of a millimetre of each other.
    assert!(
        tre_default < tre_exhaustive + 0.2,
        "TRE {tre_default:.3} mm against {tre_exhaustive:.3}"
    );
}

/// The same on a real patient's CT (TotalSegmentator's example: abdomen and pelvis at 3 mm, bowel
/// gas, contrast, a metal implant by the right femur): its landscape is not a phantom's clean
/// shapes. The TRE is measured at the project's annotation of its landmarks (the two ASIS and the
/// superior symphysis; the others lie below the scan), the poses drawn around them.
#[test]
fn refinement_recovers_the_pose_on_a_real_ct() {
    let Some(ct) = common::shared("ct/totalseg_example_ct.nii.gz") else {
        return;
    };
    let vol = fluoropose::volume::read_volume(&ct, None).unwrap();
    let lm = fluoropose::landmarks::Landmarks3d::read(
        &common::root().join("tests/data/real/totalseg_example_ct.mrk.json"),
    )
    .unwrap();
    let points = lm.present();
    assert_eq!(points.len(), 3, "L-ASIS, SPS, R-ASIS");
    let pivot = centroid(&points);
    let mut source = CpuDrr {
        volume: Arc::new(DensityVolume::from_volume(&vol, Attenuation::default())),
        renderer: Renderer::Siddon { full_line: false },
    };
    let camera = Camera::paper(128);
    let truth = perturbed_pose(
        &pivot,
        800.0,
        &Vector3::new(-0.25, 0.2, 0.15),
        &Vector3::new(-10.0, 20.0, -15.0),
    );
    let clean = source.render(&camera, &truth).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let frame = QuantumNoise {
        photons_per_pixel: 3000.0,
    }
    .apply(&clean, &mut rng);
    let init = off(
        &truth,
        &pivot,
        Vector3::new(0.03, 0.02, -0.03),
        Vector3::new(-2.0, 2.0, 25.0),
    );
    let tre0 = mean_tre_mm(&init, &truth, &points);
    assert!(tre0 > 10.0, "the start is off: {tre0} mm");
    let r = refine(
        &frame,
        &camera,
        &pivot,
        &init,
        &mut source,
        &IntensityOptions::default(),
    )
    .unwrap();
    let tre = mean_tre_mm(&r.pose, &truth, &points);
    println!(
        "real CT: TRE {tre0:.2} -> {tre:.2} mm, similarity {:.4} -> {:.4}, {} renders",
        r.similarity_before, r.similarity, r.renders
    );
    assert_found(&r, tre);
    assert!(tre < 1.0, "TRE {tre0:.2} -> {tre:.2} mm");
}

/// A frame stored the other way round (bone dark, as XA cines in MONOCHROME2 are) is matched
/// inverted, as well as the original.
#[test]
fn an_inverted_frame_is_matched_inverted() {
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = landmark_start(&s, &pivot);
    let opts = IntensityOptions::default();
    let upright = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
    assert!(!upright.inverted);
    let dark: Vec<f32> = s.frame.iter().map(|v| 4.0 - 2.0 * v).collect();
    let r = refine(&dark, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
    assert!(r.inverted);
    let (tre0, tre) = (
        mean_tre_mm(&init, &s.truth, &s.points),
        mean_tre_mm(&r.pose, &s.truth, &s.points),
    );
    assert!(tre < 0.2 * tre0, "TRE {tre0:.2} -> {tre:.2} mm");
    assert!((tre - mean_tre_mm(&upright.pose, &s.truth, &s.points)).abs() < 0.5);
}

#[test]
fn refinement_keeps_a_pose_that_is_already_right_and_rejects_bad_input() {
    let mut s = setup();
    let pivot = centroid(&s.points);
    let opts = IntensityOptions::default();
    let r = refine(&s.frame, &s.camera, &pivot, &s.truth, &mut s.source, &opts).unwrap();
    // Noise moves the optimum a little, along the beam where one view says least.
    let tre = mean_tre_mm(&r.pose, &s.truth, &s.points);
    assert!(tre < 3.0, "the truth drifted by {tre} mm");
    // A frame of the wrong size, a flat frame, a pose that is not finite: errors, not panics.
    let e = refine(
        &s.frame[1..],
        &s.camera,
        &pivot,
        &s.truth,
        &mut s.source,
        &opts,
    );
    assert!(e.unwrap_err().to_string().contains("camera is 128x128"));
    let flat = vec![0.5; s.frame.len()];
    let e = refine(&flat, &s.camera, &pivot, &s.truth, &mut s.source, &opts);
    assert!(e.unwrap_err().to_string().contains("flat"));
    let mut nan = s.truth;
    nan.translation_mm.x = f64::NAN;
    assert!(refine(&s.frame, &s.camera, &pivot, &nan, &mut s.source, &opts).is_err());
}

/// A renderer that fails, or returns too few images, gives an error (a lost GPU device, say),
/// not a panic.
#[test]
fn a_failing_renderer_is_an_error() {
    struct Lost;
    impl DrrSource for Lost {
        fn render(&mut self, _: &Camera, _: &Pose) -> Result<Vec<f32>, String> {
            Err("device lost".into())
        }
    }
    struct Short;
    impl DrrSource for Short {
        fn render(&mut self, _: &Camera, _: &Pose) -> Result<Vec<f32>, String> {
            Ok(Vec::new())
        }
        fn render_batch(&mut self, _: &Camera, _: &[Pose]) -> Result<Vec<Vec<f32>>, String> {
            Ok(Vec::new())
        }
    }
    let camera = Camera::paper(32);
    let frame: Vec<f32> = (0..32 * 32)
        .map(|i| ((i % 32) as f32 * 0.4).sin() + ((i / 32) as f32 * 0.3).cos())
        .collect();
    let pose = Pose::new(Vector3::zeros(), Vector3::new(0.0, 0.0, 800.0));
    let pivot = Point3::origin();
    let opts = IntensityOptions::default();
    let e = refine(&frame, &camera, &pivot, &pose, &mut Lost, &opts).unwrap_err();
    assert!(e.to_string().contains("device lost"), "{e}");
    let e = refine(&frame, &camera, &pivot, &pose, &mut Short, &opts).unwrap_err();
    assert!(e.to_string().contains("0 images for 1 poses"), "{e}");
}

/// A start tilted far beyond the basin of the optimiser ends in another optimum, less like the
/// frame than the threshold: then the other starts are tried, and the one that tilts it back
/// finds the pose. A start that converges tries none.
#[test]
fn a_refinement_that_ends_unlike_the_frame_restarts_elsewhere() {
    use fluoropose::registration::intensity::Start;
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = off(
        &s.truth,
        &pivot,
        Vector3::new(30f64.to_radians(), 0.0, 0.0),
        Vector3::zeros(),
    );
    let tre = |p: &Pose| mean_tre_mm(p, &s.truth, &s.points);
    let once = one_run();
    let r = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &once).unwrap();
    assert!(
        r.similarity < BELOW && tre(&r.pose) > 10.0 && r.restarts == 0,
        "one run from 30 degrees: {r:?}, TRE {} mm",
        tre(&r.pose)
    );
    let opts = IntensityOptions {
        restarts: vec![
            Start::depth(0.1),
            Start::tilt(-30.0, 0.0),
            Start::depth(-0.1),
        ],
        ..once.clone()
    };
    let r2 = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
    assert_found(&r2, tre(&r2.pose));
    assert!(
        (1..3).contains(&r2.restarts),
        "{} restarts: they stop once one gets there",
        r2.restarts
    );
    assert!(r2.renders > r.renders);
    assert!((r2.similarity_before - r.similarity_before).abs() < 1e-12);
    // Started near the truth it converges at once.
    let near = off(
        &s.truth,
        &pivot,
        Vector3::new(0.02, 0.0, 0.0),
        Vector3::zeros(),
    );
    let r3 = refine(&s.frame, &s.camera, &pivot, &near, &mut s.source, &opts).unwrap();
    assert_eq!(r3.restarts, 0);
    assert!(tre(&r3.pose) < 3.0);
    // With the scan of views on, a restart that gets over the line does not end the search once
    // the first run did not: the scan's candidates compete with it (a restart near a useless
    // start can pass the line in another optimum), and the most similar wins.
    let scanning = IntensityOptions {
        search: IntensityOptions::default().search,
        ..opts.clone()
    };
    let r4 = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &scanning).unwrap();
    assert!(
        r4.restarts >= 1 && r4.searched >= 1 && tre(&r4.pose) < 3.0,
        "{r4:?}, TRE {} mm",
        tre(&r4.pose)
    );
    assert!(r4.similarity >= r2.similarity - 1e-12);
    // Near the truth the first run gets there: no restart, no scan.
    let r5 = refine(&s.frame, &s.camera, &pivot, &near, &mut s.source, &scanning).unwrap();
    assert_eq!((r5.restarts, r5.searched), (0, 0));
}

/// A start that is no guide at all (the image upside down and the CT 300 mm deeper: the pose of
/// a few wrong landmarks) ends unlike the frame from itself; the scan of the C-arm's views finds
/// the pose from where the start puts the pivot in the image.
#[test]
fn a_start_that_is_no_guide_is_replaced_by_a_scan_of_the_views() {
    use fluoropose::registration::intensity::Search;
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = upside_down(&s, &pivot, Vector3::new(0.0, 0.0, 300.0));
    let tre = |p: &Pose| mean_tre_mm(p, &s.truth, &s.points);
    assert!(tre(&init) > 200.0, "{}", tre(&init));
    let alone = one_run();
    let r = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &alone).unwrap();
    assert!(
        r.similarity < BELOW && tre(&r.pose) > 20.0 && r.searched == 0,
        "without the scan: {r:?}, TRE {} mm",
        tre(&r.pose)
    );
    let opts = IntensityOptions {
        search: Some(Search::default()),
        ..alone
    };
    let r2 = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
    println!(
        "TRE {:.1} -> {:.2} mm, similarity {:.3}, {} candidates refined, {} DRRs",
        tre(&init),
        tre(&r2.pose),
        r2.similarity,
        r2.searched,
        r2.renders
    );
    assert_found(&r2, tre(&r2.pose));
    assert!((1..=3).contains(&r2.searched));
    assert!(r2.renders > r.renders + 375, "the scan's DRRs are counted");
    // A start that converges scans nothing.
    let r3 = refine(&s.frame, &s.camera, &pivot, &s.truth, &mut s.source, &opts).unwrap();
    assert_eq!((r3.restarts, r3.searched), (0, 0));
}

/// Seen from behind, the pelvis looks almost as from the front, mirrored: a start there ends in
/// that mirror optimum, a view no C-arm takes. Such a result is not taken, and the scan finds
/// the pose.
#[test]
fn the_mirror_optimum_behind_the_patient_is_not_taken() {
    use fluoropose::geometry::sampling::angle_from_ap_rad;
    let mut s = setup();
    let pivot = centroid(&s.points);
    let behind = off(
        &s.truth,
        &pivot,
        Vector3::new(0.0, 180f64.to_radians(), 0.0),
        Vector3::zeros(),
    );
    let tre = |p: &Pose| mean_tre_mm(p, &s.truth, &s.points);
    let angle = |p: &Pose| angle_from_ap_rad(p).to_degrees();
    assert!(angle(&behind) > 150.0, "{}", angle(&behind));
    let anything = IntensityOptions {
        max_angle_from_ap_deg: 180.0,
        ..one_run()
    };
    let r = refine(
        &s.frame,
        &s.camera,
        &pivot,
        &behind,
        &mut s.source,
        &anything,
    )
    .unwrap();
    println!(
        "any view: angle {:.1} deg, TRE {:.1} mm, similarity {:.3}, scanned {}",
        angle(&r.pose),
        tre(&r.pose),
        r.similarity,
        r.searched
    );
    assert!(
        angle(&r.pose) > 90.0 && tre(&r.pose) > 50.0,
        "the mirror optimum: {r:?}"
    );
    let carm = IntensityOptions {
        search: IntensityOptions::default().search,
        max_angle_from_ap_deg: 90.0,
        ..anything
    };
    let r2 = refine(&s.frame, &s.camera, &pivot, &behind, &mut s.source, &carm).unwrap();
    println!(
        "C-arm views: angle {:.1} deg, TRE {:.2} mm, similarity {:.3}, scanned {}",
        angle(&r2.pose),
        tre(&r2.pose),
        r2.similarity,
        r2.searched
    );
    assert!(r2.searched > 0 && tre(&r2.pose) < 3.0, "{r2:?}");
}

/// A start built on wrong landmarks can be off across the beam as well: here the image upside
/// down, the CT 250 mm deeper and a third of the field to the side. Scanning the views with the
/// pivot where the start shows it finds nothing like the frame; placing each candidate where it
/// correlates best with the frame finds the pose.
#[test]
fn the_scan_places_its_candidates_across_the_beam() {
    use fluoropose::registration::intensity::Search;
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = upside_down(&s, &pivot, Vector3::new(110.0, -70.0, 250.0));
    let tre = |p: &Pose| mean_tre_mm(p, &s.truth, &s.points);
    let across = |p: &Pose| {
        let (a, b) = (
            s.camera.project(p, &pivot),
            s.camera.project(&s.truth, &pivot),
        );
        (a - b).norm()
    };
    assert!(across(&init) > 25.0, "{} px", across(&init));
    let scan = |search: Search| IntensityOptions {
        search: Some(search),
        ..one_run()
    };
    let fixed = scan(Search {
        shift_fraction: 0.0,
        ..Search::default()
    });
    let r = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &fixed).unwrap();
    println!(
        "pivot where the start shows it ({:.0} px off): TRE {:.1} mm, similarity {:.3}",
        across(&init),
        tre(&r.pose),
        r.similarity
    );
    assert!(r.searched == 3 && tre(&r.pose) > 20.0, "{r:?}");
    let placed = scan(Search::default());
    let r2 = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &placed).unwrap();
    println!(
        "placed: TRE {:.1} -> {:.2} mm, similarity {:.3}, {} candidates refined, {} DRRs",
        tre(&init),
        tre(&r2.pose),
        r2.similarity,
        r2.searched,
        r2.renders
    );
    assert_found(&r2, tre(&r2.pose));
}

/// A watched refinement reports the DRRs it renders as its progress and the run under way as its
/// message, and ends the same as an unwatched one. Cancelled, it stops before its next batch of
/// DRRs: at once when cancelled before it starts, and mid-way (here by the renderer, as the app's
/// Cancel button would from the UI thread) with no DRR rendered after the cancellation.
#[test]
fn a_watched_refinement_reports_its_progress_and_stops_when_cancelled() {
    /// Renders through `inner`, counting the DRRs, and cancels `task` after `cancel_after`.
    struct Counting<'a> {
        inner: &'a mut CpuDrr,
        task: Task,
        rendered: usize,
        cancel_after: usize,
    }
    impl DrrSource for Counting<'_> {
        fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String> {
            self.rendered += 1;
            if self.rendered >= self.cancel_after {
                self.task.cancel();
            }
            self.inner.render(camera, pose)
        }
    }
    let mut s = setup();
    let pivot = centroid(&s.points);
    let init = off(
        &s.truth,
        &pivot,
        Vector3::new(0.02, -0.02, 0.0),
        Vector3::new(1.0, -1.0, 20.0),
    );
    let opts = one_run();
    let plain = refine(&s.frame, &s.camera, &pivot, &init, &mut s.source, &opts).unwrap();
    let task = Task::new();
    let mut counting = Counting {
        inner: &mut s.source,
        task: task.clone(),
        rendered: 0,
        cancel_after: usize::MAX,
    };
    let (frame, camera) = (&s.frame, &s.camera);
    let watch = |source: &mut Counting, task: &Task| {
        refine_watched(frame, camera, &pivot, &init, source, &opts, task)
    };
    let watched = watch(&mut counting, &task).unwrap();
    assert_eq!(watched.pose, plain.pose);
    assert_eq!(watched.renders, plain.renders);
    let (done, _, message) = task.progress();
    assert_eq!(done as usize, watched.renders);
    assert_eq!(counting.rendered, watched.renders);
    assert!(!message.is_empty());

    let cancelled = Task::new();
    cancelled.cancel();
    counting.rendered = 0;
    let e = watch(&mut counting, &cancelled);
    assert!(matches!(e, Err(IntensityError::Cancelled)), "{e:?}");
    assert_eq!(counting.rendered, 0);

    let midway = Task::new();
    counting.task = midway.clone();
    counting.rendered = 0;
    counting.cancel_after = 10;
    let e = watch(&mut counting, &midway);
    assert!(matches!(e, Err(IntensityError::Cancelled)), "{e:?}");
    // The batch under way when it was cancelled finishes (a finite-difference batch is 6-12
    // DRRs); nothing after it.
    assert!(
        (10..=10 + 12).contains(&counting.rendered) && counting.rendered < plain.renders,
        "{} DRRs rendered, {} in the whole refinement",
        counting.rendered,
        plain.renders
    );
    assert_eq!(midway.progress().0 as usize, counting.rendered);
}
