//! The command line end to end: each subcommand on files it made itself, checked against the
//! library (the same numbers, the documented JSON shapes, clear errors).

#![allow(clippy::unwrap_used)] // test helpers may panic: that is how a test fails

mod common;

use fluoropose::geometry::Camera;
use fluoropose::geometry::sampling::PoseRange;
use fluoropose::landmarks::Landmarks3d;
use fluoropose::registration::metrics::rotation_error_deg;
use rand::SeedableRng;
use serde_json::Value;
use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fluoropose"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn phantom_info_register_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) = run(&["phantom", "--subject", "3..4", "--spacing", "6", "--out", d]);
    assert!(ok, "{err}");
    let nii = dir.path().join("phantom_0004.nii.gz");
    let mrk = dir.path().join("phantom_0004.mrk.json");
    assert!(nii.exists() && mrk.exists() && dir.path().join("phantom_0003.nii.gz").exists());

    let (ok, out, err) = run(&["info", "--json", nii.to_str().unwrap()]);
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&out).unwrap();
    let vol = fluoropose::volume::read_nifti(&nii).unwrap();
    assert_eq!(info["dims"], serde_json::json!(vol.dims()));
    // `info` takes a phantom by id, as every other command that takes a CT does.
    let (ok, out, err) = run(&["info", "phantom:4"]);
    assert!(ok, "{err}");
    assert!(out.contains("subject 4"), "{out}");
    assert_eq!(info["orientation"], "LPS");

    // Project the subject's landmarks at a random pose, then ask `register` for the pose.
    let lm = Landmarks3d::read(&mrk).unwrap().all().unwrap();
    let cam = Camera::new(1020.0, 512, 512, 0.75, 0.75);
    let iso = vol.center_mm();
    let truth = PoseRange::default().sample(&mut rand_chacha::ChaCha8Rng::seed_from_u64(5), &iso);
    let uv: Vec<[f64; 2]> = lm
        .iter()
        .map(|p| {
            let q = cam.project(&truth, p);
            [q.x, q.y]
        })
        .collect();
    let p2 = dir.path().join("points2d.json");
    std::fs::write(&p2, serde_json::to_string(&uv).unwrap()).unwrap();
    let (ok, out, err) = run(&[
        "register",
        "--points3d",
        mrk.to_str().unwrap(),
        "--points2d",
        p2.to_str().unwrap(),
        "--sdd",
        "1020",
        "--height",
        "512",
        "--delx",
        "0.75",
    ]);
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["status"], "converged");
    let f = |v: &Value| v.as_f64().unwrap();
    let pose = fluoropose::geometry::Pose::new(
        nalgebra::Vector3::new(
            f(&r["rotation"][0]),
            f(&r["rotation"][1]),
            f(&r["rotation"][2]),
        ),
        nalgebra::Vector3::new(
            f(&r["translation"][0]),
            f(&r["translation"][1]),
            f(&r["translation"][2]),
        ),
    );
    assert!(rotation_error_deg(&pose, &truth) < 1e-4);
    assert!((pose.translation_mm - truth.translation_mm).norm() < 1e-3);
    assert!(f(&r["rmse_px"]) < 1e-3);
    assert!(r["iterations"].as_u64().is_some());

    // The paper's solver answers in the same shape.
    let (ok, out, _) = run(&[
        "register",
        "--points3d",
        mrk.to_str().unwrap(),
        "--points2d",
        p2.to_str().unwrap(),
        "--sdd",
        "1020",
        "--height",
        "512",
        "--delx",
        "0.75",
        "--solver",
        "adam-paper",
    ]);
    assert!(ok);
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["rotation"].as_array().unwrap().len(), 3);
    assert_eq!(r["iterations"], 100);
}

#[test]
fn render_on_the_cpu_matches_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("drr.npy");
    let (ok, _, err) = run(&[
        "render",
        "--ct",
        "phantom:2",
        "--height",
        "24",
        "--width",
        "32",
        "--delx",
        "12",
        "--sdd",
        "1020",
        "--diffdrr-pose",
        "0.2,-0.1,0.3,10,850,-5",
        "--cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (img, w, h) = fluoropose::drr::image_io::read_npy(&out).unwrap();
    assert_eq!((w, h), (32, 24));
    let vol = fluoropose::cli::load_ct("phantom:2", None).unwrap();
    let dv =
        fluoropose::drr::DensityVolume::from_volume(&vol, fluoropose::drr::Attenuation::diffdrr());
    let pose = fluoropose::geometry::diffdrr::DiffDrrPose::parse("0.2,-0.1,0.3,10,850,-5")
        .unwrap()
        .to_pose(&vol.center_mm());
    let cam = fluoropose::geometry::diffdrr::camera(1020.0, 24, 12.0, Some(32), None);
    let want = fluoropose::drr::cpu::render(
        &dv,
        &cam,
        &pose,
        fluoropose::drr::cpu::Renderer::Siddon { full_line: true },
    );
    assert_eq!(img, want);
    // A PNG is written too, 16-bit.
    let png = dir.path().join("drr.png");
    let (ok, _, _) = run(&[
        "render",
        "--ct",
        "phantom:2",
        "--height",
        "24",
        "--delx",
        "12",
        "--sdd",
        "1020",
        "--pose",
        "1.5708,0,0,0,0,800",
        "--cpu",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok);
    assert_eq!(image::open(&png).unwrap().color(), image::ColorType::L16);
}

#[test]
fn bad_input_gives_a_clear_error_and_a_failure_code() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.nii.gz");
    let (ok, _, err) = run(&["info", missing.to_str().unwrap()]);
    assert!(!ok && err.contains("nope.nii.gz"), "{err}");
    // The reason once: the library's error names it and returns it as its source too.
    assert_eq!(err.matches("no such file").count(), 1, "{err}");
    let (ok, _, err) = run(&["info", "phantom:x"]);
    assert!(!ok && err.contains("must be a number"), "{err}");
    let (ok, _, err) = run(&[
        "render",
        "--ct",
        "phantom:x",
        "--height",
        "8",
        "--delx",
        "1",
        "--sdd",
        "1020",
        "--pose",
        "0,0,0,0,0,800",
        "--out",
        "/tmp/x.npy",
    ]);
    assert!(
        !ok && err.contains("phantom subject must be a number"),
        "{err}"
    );
    let p2 = dir.path().join("p2.json");
    std::fs::write(&p2, "[[1,2],[3,NaN]]").unwrap();
    let p3 = dir.path().join("p3.json");
    std::fs::write(&p3, "[[1,2,3],[4,5,6]]").unwrap();
    let (ok, _, err) = run(&[
        "register",
        "--points3d",
        p3.to_str().unwrap(),
        "--points2d",
        p2.to_str().unwrap(),
        "--sdd",
        "1020",
        "--height",
        "8",
        "--delx",
        "1",
    ]);
    assert!(!ok && err.contains("p2.json"), "{err}");
    let (ok, _, err) = run(&[
        "project",
        "--ct",
        "phantom:0",
        "--height",
        "8",
        "--delx",
        "1",
        "--sdd",
        "1020",
        "--diffdrr-pose",
        "0,0,0",
        "--voxels",
        "1,2,3",
    ]);
    assert!(!ok && err.contains("6 finite numbers"), "{err}");
    let (ok, _, err) = run(&[
        "eval",
        "--model",
        "nowhere.safetensors",
        "--data",
        "nowhere",
        "--mirror",
        "--shift-px",
        "300",
    ]);
    assert!(!ok && err.contains("--shift-px 300: at most 64"), "{err}");
    let (ok, _, err) = run(&[
        "eval",
        "--model",
        "nowhere.safetensors",
        "--data",
        "nowhere",
        "--zoom-pct",
        "40",
    ]);
    assert!(!ok && err.contains("--zoom-pct 40: at most 25"), "{err}");
    let out = dir.path().join("ds");
    let (ok, _, err) = run(&[
        "dataset",
        "--ct",
        "phantom:1..2",
        "--landmarks",
        p3.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--landmarks goes with one CT file"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "dataset",
        "--ct",
        "phantom:1..2",
        "--photons",
        "1000",
        "--photons-min",
        "5000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--photons-min 5000 must be above 0 and below --photons 1000"),
        "{err}"
    );
    assert!(!out.exists(), "a refused dataset left {}", out.display());
    let (ok, _, err) = run(&["bench", "refine", "--ct", missing.to_str().unwrap()]);
    assert!(
        !ok && err.contains("reading the CT") && err.contains("nope.nii.gz"),
        "{err}"
    );
}

/// A real patient's CT from outside the project, with the project's annotation of the three
/// landmarks its scan holds (both ASIS, the superior symphysis): `dataset` labels those and
/// marks the five below the scan absent, and `eval` scores the shipped network on the three,
/// with "-" for the others, and flags the frames as ones it is unsure of.
#[test]
fn a_real_ct_with_three_landmarks_makes_a_dataset_that_eval_scores() {
    let Some(ct) = common::shared("ct/totalseg_example_ct.nii.gz") else {
        return;
    };
    if !fluoropose::model::shipped::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("real");
    let lm = common::root().join("tests/data/real/totalseg_example_ct.mrk.json");
    let (ok, _, err) = run(&[
        "dataset",
        "--ct",
        ct.to_str().unwrap(),
        "--landmarks",
        lm.to_str().unwrap(),
        "--views",
        "3",
        "--novel-views",
        "0",
        "--max-rotation-deg",
        "15",
        "--cpu",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let json = dir.path().join("eval.json");
    let (ok, out, err) = run(&[
        "eval",
        "--model",
        "default",
        "--data",
        data.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(r["images"], 3, "{r}");
    for l in ["L1", "L4", "L8"] {
        assert!(r["rmse_px"][l].as_f64().unwrap().is_finite(), "{l}: {r}");
    }
    for l in ["L2", "L3", "L5", "L6", "L7"] {
        assert!(r["rmse_px"][l].is_null(), "{l}: {r}");
    }
    let row = out.lines().find(|l| l.starts_with("| default")).unwrap();
    assert_eq!(row.split('|').nth(6).unwrap().trim(), "-", "{row}");
    // Anatomy it never saw: the network misses, and says it is unsure of every frame (these
    // score about 0.3, phantoms about 0.99), which the app shows over the image.
    assert!(r["rmse_px"]["mean"].as_f64().unwrap() > 50.0, "{r}");
    assert_eq!(r["unsure"]["rate"], 1.0, "{r}");
    // The errors by score: every image in a bin under the cut.
    let bins = r["by_score"].as_array().unwrap();
    let images: u64 = bins.iter().map(|b| b["images"].as_u64().unwrap()).sum();
    assert_eq!(images, 3, "{r}");
    assert!(
        bins.iter().all(|b| b["score"][1].as_f64().unwrap() <= 0.9),
        "{r}"
    );
}

#[test]
fn frames_and_simulate_commands() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = run(&[
        "simulate", "--frames", "3", "--size", "24", "--cpu", "--out", d,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("3 frames"));
    let poses = std::fs::read_to_string(dir.path().join("poses.jsonl")).unwrap();
    assert_eq!(poses.lines().count(), 3);
    let (img, w, h) =
        fluoropose::drr::image_io::read_npy(&dir.path().join("frame_0002.npy")).unwrap();
    assert_eq!((w, h, img.len()), (24, 24, 576));
    let cam: Camera =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("camera.json")).unwrap())
            .unwrap();
    assert_eq!(cam.width_px, 24);

    let (ok, out, err) = run(&["frames", "/definitely/not/here.dcm"]);
    assert!(!ok && err.contains("here.dcm"), "{out}{err}");
    let cine = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/fluoro/XA-MONO2-8-12x-catheter.dcm");
    if cine.exists() {
        let (ok, out, err) = run(&["frames", cine.to_str().unwrap()]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["frames"], 12);
        assert_eq!(v[0]["primary_angle_deg"], 77.0);
    }
}

/// `bench pipeline`: the Live tab's pipeline without a window delivers solved frames and reports
/// the documented JSON.
#[test]
fn bench_pipeline_runs_the_live_pipeline_headless() {
    if std::env::var("FLUOROPOSE_SKIP_GPU").is_ok_and(|v| v == "1") {
        return;
    }
    let (ok, out, err) = run(&[
        "bench",
        "pipeline",
        "--seconds",
        "3",
        "--warmup",
        "2",
        "--fps",
        "30",
        "--network",
        "compact",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["network"].as_str().unwrap().contains("compact"), "{v}");
    assert!(v["frames"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["fps"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["registration_failures"], 0, "{v}");
    for k in [
        "latency_ms",
        "inference_ms",
        "pose_ms",
        "drr_ms",
        "source_ms",
    ] {
        let x = v[k].as_f64().unwrap();
        assert!(x.is_finite() && x >= 0.0, "{k}: {v}");
    }
    assert!(v["latency_ms"].as_f64().unwrap() >= v["inference_ms"].as_f64().unwrap());
}

/// `eval --model default|compact` scores the embedded networks by name (no file needed), and a
/// file of that name, when one exists, still wins.
#[test]
fn eval_reads_the_shipped_networks_by_name() {
    use fluoropose::model::shipped::Shipped;
    if std::env::var("FLUOROPOSE_SKIP_GPU").is_ok_and(|v| v == "1")
        || !(Shipped::Default.available() && Shipped::Compact.available())
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ds");
    let (ok, _, err) = run(&[
        "dataset",
        "--ct",
        "phantom:61..61",
        "--views",
        "2",
        "--novel-views",
        "0",
        "--size",
        "256",
        "--max-rotation-deg",
        "20",
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let score = |model: &str| -> Value {
        let json = dir.path().join(format!("{model}.json"));
        let (ok, _, err) = run(&[
            "eval",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(ok, "{model}: {err}");
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
    };
    let (wide, compact) = (score("default"), score("compact"));
    for r in [&wide, &compact] {
        assert_eq!(r["images"], 2, "{r}");
        // Held-out phantom, near AP: both find the pelvis, and are sure of it.
        assert!(r["rmse_px"]["mean"].as_f64().unwrap() < 20.0, "{r}");
        assert_eq!(r["unsure"]["rate"], 0.0, "{r}");
    }
    assert_ne!(wide["rmse_px"], compact["rmse_px"]);
    // A file named like one is read as the file (here: not weights, so a clear error).
    std::fs::write(dir.path().join("compact"), b"not weights").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fluoropose"))
        .current_dir(dir.path())
        .args(["eval", "--model", "compact", "--data", "ds"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("loading compact"),
        "{err}"
    );
}

/// `predict --ct` refines each pose against the frame: on a DRR rendered at a known pose, the
/// refined pose is much closer to it than the landmarks' pose. `bench refine` reports the same
/// kind of gain.
#[test]
fn predict_refines_the_pose_against_the_ct_and_bench_refine_measures_it() {
    if std::env::var("FLUOROPOSE_SKIP_GPU").is_ok_and(|v| v == "1")
        || !fluoropose::model::shipped::available()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("frame.png");
    let (vol, lm) = fluoropose::volume::phantom::phantom_subject(62, None);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let range = PoseRange {
        max_rotation_rad: 20f64.to_radians(),
        ..PoseRange::default()
    };
    let truth = range.sample(&mut rng, &vol.center_mm());
    let pose = truth.params().map(|v| v.to_string()).join(",");
    let (ok, _, err) = run(&[
        "render",
        "--ct",
        "phantom:62",
        "--height",
        "256",
        "--delx",
        "1.5",
        "--sdd",
        "1020",
        "--pose",
        &pose,
        "--attenuation",
        "physical",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["predict", png.to_str().unwrap(), "--ct", "phantom:62"]);
    assert!(ok, "{err}");
    // Its progress goes to stderr (as lines where stderr is not a terminal), the JSON to stdout.
    assert!(err.contains("predict: 1/1 (100%)"), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let params = |k: &str| -> fluoropose::geometry::Pose {
        let p: Vec<f64> = serde_json::from_value(v[0][k].clone()).unwrap();
        fluoropose::geometry::Pose::from_params(&p.try_into().unwrap())
    };
    let pts: Vec<_> = lm.present();
    let tre = |p: &fluoropose::geometry::Pose| {
        fluoropose::registration::metrics::mean_tre_mm(p, &truth, &pts)
    };
    let (landmarks, refined) = (tre(&params("pose")), tre(&params("refined_pose")));
    assert!(
        refined < 1.0 && refined < landmarks,
        "landmarks {landmarks} mm, refined {refined} mm"
    );
    let sim: Vec<f64> = serde_json::from_value(v[0]["similarity"].clone()).unwrap();
    assert!(sim[1] >= sim[0], "{sim:?}");
    assert_eq!(v[0]["inverted"], false, "a DRR has the DRR's polarity");
    assert_eq!(
        v[0]["frame_inverted"], false,
        "and the network reads it as stored"
    );
    // Landmarks at the pose: the same pose, every point moved onto the CT's projection, none
    // farther than the agreement gate (3% of the width) from its peak.
    let frame = png.to_str().unwrap();
    let at = |extra: &[&str]| {
        let (ok, out, err) =
            run(&[&["predict", frame, "--landmarks", "phantom:62"], extra].concat());
        assert!(ok, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()
    };
    let (peaks, registered) = (at(&[]), at(&["--registered"]));
    assert_eq!(peaks[0]["pose"], registered[0]["pose"]);
    let points =
        |v: &Value| -> Vec<[f64; 2]> { serde_json::from_value(v[0]["landmarks"].clone()).unwrap() };
    let moved: Vec<f64> = points(&peaks)
        .iter()
        .zip(points(&registered))
        .map(|(a, b)| (a[0] - b[0]).hypot(a[1] - b[1]))
        .collect();
    assert!(moved.iter().any(|d| *d > 1e-6), "{moved:?}");
    assert!(moved.iter().all(|d| *d < 0.03 * 256.0), "{moved:?}");
    // The other embedded network by name: another network's peaks, as many of them.
    if fluoropose::model::shipped::Shipped::Compact.available() {
        let compact = at(&["--model", "compact"]);
        assert_eq!(points(&compact).len(), points(&peaks).len());
        assert_ne!(points(&compact), points(&peaks));
        assert_eq!(
            at(&["--model", "default"])[0]["landmarks"],
            peaks[0]["landmarks"]
        );
    }
    let (ok, _, err) = run(&["predict", frame, "--registered"]);
    assert!(
        !ok && err.contains("--registered needs the CT's landmarks"),
        "{err}"
    );
    // Without the CT's landmarks there is no pose to start from.
    let (ok, _, err) = run(&[
        "predict",
        png.to_str().unwrap(),
        "--ct",
        dir.path().join("missing.nii.gz").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("missing.nii.gz"), "{err}");

    let (ok, out, err) = run(&["bench", "refine", "--frames", "1", "--json"]);
    assert!(ok, "{err}");
    let b: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(b["renders_per_frame"].as_f64().unwrap() > 10.0, "{b}");
    assert!(
        b["tre_after_mm"].as_f64().unwrap() < 0.5 * b["tre_before_mm"].as_f64().unwrap(),
        "{b}"
    );
}

/// `label` turns frames of a CT'd patient into training data with no annotator: on a simulated
/// stream, every stored pose is within millimetres of the truth the stream recorded, its labels
/// are the CT's landmarks projected there, and `train` can open the folder.
#[test]
fn label_makes_a_dataset_from_frames_and_their_ct() {
    if std::env::var("FLUOROPOSE_SKIP_GPU").is_ok_and(|v| v == "1")
        || !fluoropose::model::shipped::available()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    let out = dir.path().join("labelled");
    let (ok, _, err) = run(&[
        "simulate",
        "--ct",
        "phantom:62",
        "--frames",
        "3",
        "--fps",
        "1",
        "--photons",
        "20000",
        "--out",
        frames.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // `label` of a folder of frames of phantom 62 into a dataset.
    let label = |from: &std::path::Path, to: &std::path::Path| {
        run(&[
            "label",
            from.to_str().unwrap(),
            "--ct",
            "phantom:62",
            "--out",
            to.to_str().unwrap(),
        ])
    };
    let (ok, text, err) = label(&frames, &out);
    assert!(ok, "{err}");
    assert!(text.contains("labelled 3 of 3 frames"), "{text}");
    let ds = fluoropose::dataset::Dataset::open(&out).unwrap();
    assert_eq!(ds.samples.len(), 3);
    let truth: Vec<Value> = std::fs::read_to_string(frames.join("poses.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lm = fluoropose::volume::phantom::phantom_subject(62, None).1;
    let pts = lm.present();
    for (s, t) in ds.samples.iter().zip(&truth) {
        let v = |k: &str| -> Vec<f64> { serde_json::from_value(t[k].clone()).unwrap() };
        let (r, tr) = (v("rotation"), v("translation"));
        let true_pose =
            fluoropose::geometry::Pose::from_params(&[r[0], r[1], r[2], tr[0], tr[1], tr[2]]);
        let tre = fluoropose::registration::metrics::mean_tre_mm(&s.pose(), &true_pose, &pts);
        assert!(tre < 2.0, "{}: {tre} mm", s.image);
        for (i, l) in s.landmarks.iter().enumerate() {
            if let Some([x, y]) = l {
                let q = ds.manifest.camera.project(&true_pose, &pts[i]);
                assert!((q.x - x).hypot(q.y - y) < 1.5, "{}: L{}", s.image, i + 1);
            }
        }
    }
    // The same frames bone dark, as many fluoroscopes show them: read inverted, and stored the
    // way the network read them (bone bright), the same images as above.
    let dark = dir.path().join("dark");
    std::fs::create_dir_all(&dark).unwrap();
    std::fs::copy(frames.join("camera.json"), dark.join("camera.json")).unwrap();
    for f in fluoropose::stream::frame_files(&frames).unwrap() {
        let x = fluoropose::stream::read_image_file(&f).unwrap();
        let neg: Vec<f32> = x.frames[0].iter().map(|v| -v).collect();
        std::fs::write(
            dark.join(f.file_name().unwrap()),
            fluoropose::drr::image_io::npy_bytes(&neg, x.width, x.height),
        )
        .unwrap();
    }
    let out_dark = dir.path().join("labelled_dark");
    let (ok, text, err) = label(&dark, &out_dark);
    assert!(ok && text.contains("labelled 3 of 3 frames"), "{text}{err}");
    let dd = fluoropose::dataset::Dataset::open(&out_dark).unwrap();
    for (a, b) in ds.samples.iter().zip(&dd.samples) {
        assert_eq!(ds.image(a).unwrap(), dd.image(b).unwrap(), "{}", a.image);
    }
    // A CT that is not there: a clear error, nothing written.
    let (ok, _, err) = run(&[
        "label",
        frames.to_str().unwrap(),
        "--ct",
        "phantom:x",
        "--out",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("phantom:N"), "{err}");
    assert!(!dir.path().join("none").exists());
}

/// The shipped networks learnt phantoms: on real X-ray files from outside the project (an
/// angiography cine, a single XA frame, a hip radiograph, a CT scout of the pelvis) `predict`
/// says it is unsure of every frame (scores 0.07-0.71; the phantoms' are 0.99+ on 89% of
/// frames).
#[test]
fn predict_is_unsure_of_real_x_rays() {
    if !fluoropose::model::shipped::available() {
        return;
    }
    for (rel, frames) in [
        ("fluoro/XA-MONO2-8-12x-catheter.dcm", 12),
        ("fluoro/WG04_XA1/XA1_UNC", 1),
        ("xray/WG04_RG2_hip/RG2_UNC", 1),
        ("xray/OT-MONO2-8-hip.dcm", 1),
    ] {
        let Some(p) = common::shared(rel) else {
            return;
        };
        let (ok, out, err) = run(&["predict", p.to_str().unwrap()]);
        assert!(ok, "{rel}: {err}");
        let r: Value = serde_json::from_str(&out).unwrap();
        let r = r.as_array().unwrap();
        assert_eq!(r.len(), frames, "{rel}");
        for f in r {
            let score = f["score"].as_f64().unwrap();
            assert!(f["unsure"] == true && score < 0.9, "{rel}: {f}");
        }
    }
}
