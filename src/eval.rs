//! Evaluation as the paper's Table 1: landmarks by argmax, RMSE in pixels at 512 scale (mean and
//! per landmark L1..L8), and beyond the paper the pose the production solver recovers from the
//! predicted landmarks (TRE, rotation and translation errors).

use crate::dataset::{Dataset, Sample, Split};
use crate::detect::{Decode, Polarity, peak_search, polarity_score};
use crate::drr::{AnyDrr, Attenuation, DensityVolume};
use crate::landmarks::N_LANDMARKS;
use crate::model::{UNet, heatmap};
use crate::registration::consensus;
use crate::registration::intensity::{self, IntensityOptions};
use crate::registration::{metrics, solve_detections};
use crate::task::{Cancelled, Task};
use candle_core::Tensor;
use nalgebra::Point2;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

/// Table 1's numbers for one split.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Which split (`all`, `novel-view`, `novel-subject`, `train`).
    pub split: String,
    /// Images evaluated.
    pub images: usize,
    /// RMSE at 512 scale, integer argmax (the paper's measure): `mean`, `L1`..`L8`.
    pub rmse_px: serde_json::Map<String, serde_json::Value>,
    /// Mean RMSE at 512 scale with the sub-pixel argmax.
    pub rmse_subpixel_px: f64,
    /// Mean target registration error over the 8 3D landmarks, mm (solved from the predictions).
    pub tre_mm: f64,
    /// Median TRE, mm.
    pub tre_median_mm: f64,
    /// Mean rotation error, degrees.
    pub rotation_error_deg: f64,
    /// Mean translation error (source position), mm.
    pub translation_error_mm: f64,
    /// Images whose registration failed (not in the pose errors).
    pub registration_failures: usize,
    /// RMSE at 512 scale of the CT's landmarks projected at the pose solved from the
    /// predictions (images whose registration worked): the landmarks as the registered CT
    /// places them, 6 pose parameters fitted to 16 coordinates.
    #[serde(default)]
    pub pose_rmse_px: f64,
    /// Median landmark error at 512 scale, px (the typical landmark, where the RMSE is the
    /// misses' measure as much as the hits').
    #[serde(default)]
    pub median_error_px: f64,
    /// Share of visible landmarks more than [`MISS_PX`] (at 512 scale) from the truth: gross
    /// misses.
    #[serde(default)]
    pub miss_rate: f64,
    /// Share of the squared error (the mean RMSE's square) that the misses carry.
    #[serde(default)]
    pub miss_error_share: f64,
    /// RMSE at 512 scale over the landmarks that are not misses: the accuracy apart from the
    /// tail that most of the mean RMSE is made of.
    #[serde(default)]
    pub rmse_hits_px: f64,
    /// Of the misses, the share whose heatmap held a peak ([`heatmap::candidates`]) within
    /// [`NEAR_TRUTH_PX`] of the truth: a decoding could still have found those, where for the
    /// rest the network saw nothing there (`None`: no heatmaps, or no misses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misses_with_peak_rate: Option<f64>,
    /// With the pose-consistent decoding: share of landmarks taken from a weaker peak of their
    /// heatmap.
    #[serde(default)]
    pub other_peak_rate: f64,
    /// With the pose-consistent decoding: share of landmarks put at the pose's reprojection
    /// (no peak of their heatmap agreed).
    #[serde(default)]
    pub reprojected_rate: f64,
    /// With intensity-based refinement: the poses after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refined: Option<RefinedReport>,
    /// Image by image, when [`EvalOptions::per_image`] asks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_image: Vec<ImageResult>,
    /// Share of the images the network read inverted ([`crate::detect::Polarity`]).
    #[serde(default)]
    pub inverted_rate: f64,
    /// The landmark errors by how far each view is turned from AP ([`ANGLE_BINS_DEG`]): the
    /// three ±45° turns compose to views up to about 86° from AP, and the errors grow with it.
    #[serde(default)]
    pub by_angle: Vec<AngleBin>,
    /// How large the detected landmarks look against the truth ([`apparent_scale`]), over the
    /// images with at least [`SCALE_MIN_LANDMARKS`] landmarks in view and a solved pose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apparent_scale: Option<ScaleReport>,
    /// The images the network is unsure of ([`crate::detect::UNSURE_BELOW`]; a network's
    /// reading only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsure: Option<UnsureReport>,
    /// How noisy the images were to the network, and how many were smoothed (a network's
    /// reading only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_noise: Option<NoiseReport>,
    /// The errors by how well the network read each image ([`SCORE_BINS`]; a network's reading
    /// only): what a frame's score says about its landmarks and pose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_score: Vec<ScoreBin>,
}

/// Edges of [`Report::by_score`]'s bins: the frame score ([`crate::detect::polarity_score`]).
pub const SCORE_BINS: [f64; 7] = [0.0, 0.8, 0.9, 0.95, 0.98, 0.99, f64::INFINITY];

/// The errors of the images whose score lies in one range.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScoreBin {
    /// The range of scores: `[from, to)`.
    pub score: [f64; 2],
    /// Images in it.
    pub images: usize,
    /// Their landmarks' errors.
    #[serde(flatten)]
    pub errors: ErrorStats,
    /// Mean TRE of their landmark poses, mm (NaN: no registration worked).
    pub tre_mm: f64,
}

/// Landmark errors at 512 scale, summarised.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ErrorStats {
    /// Visible landmarks.
    pub landmarks: usize,
    /// RMSE.
    pub rmse_px: f64,
    /// Median error.
    pub median_error_px: f64,
    /// Share more than [`MISS_PX`] from the truth.
    pub miss_rate: f64,
}

impl ErrorStats {
    fn of(mut e: Vec<f64>) -> Self {
        let n = e.len().max(1) as f64;
        Self {
            landmarks: e.len(),
            rmse_px: (e.iter().map(|x| x * x).sum::<f64>() / n).sqrt(),
            miss_rate: e.iter().filter(|x| **x > MISS_PX).count() as f64 / n,
            median_error_px: median(&mut e),
        }
    }
}

/// How the app's "network unsure" warning ([`crate::detect::unsure`]) splits a set: does it
/// flag the images whose landmarks are wrong?
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct UnsureReport {
    /// Share of the images flagged.
    pub rate: f64,
    /// Landmark RMSE at 512 scale on the flagged images (NaN: none).
    pub rmse_px: f64,
    /// Landmark RMSE at 512 scale on the others (NaN: none).
    pub rmse_rest_px: f64,
}

/// How noisy the images were to the network ([`crate::model::noise::level`] of each input) and
/// how many the decoding smoothed (`--denoise auto`): what dose a set is, on the scale the app's
/// smoothing and the live stream's `input_noise` use.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct NoiseReport {
    /// Mean noise level.
    pub mean: f64,
    /// Median noise level.
    pub median: f64,
    /// Lowest and highest.
    pub min: f64,
    pub max: f64,
    /// Share of the images smoothed before the network read them.
    pub smoothed_rate: f64,
}

impl NoiseReport {
    fn of(noise: &[crate::model::noise::InputNoise]) -> Option<Self> {
        if noise.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = noise.iter().map(|n| n.noise as f64).collect();
        let n = v.len() as f64;
        let smoothed = noise.iter().filter(|r| r.smoothed_px > 0.0).count();
        Some(Self {
            mean: v.iter().sum::<f64>() / n,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median: median(&mut v),
            smoothed_rate: smoothed as f64 / n,
        })
    }
}

/// What the detected constellation's apparent size says about the landmark pose's depth: one
/// view reads the pelvis' distance from the source from how large its landmarks look, so a
/// constellation detected 1% too small puts the pelvis 1% of its depth too far, whatever the
/// solver does with it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ScaleReport {
    /// Images scored.
    pub images: usize,
    /// Mean `|s - 1|`.
    pub mean_error: f64,
    /// Median `|s - 1|`.
    pub median_error: f64,
    /// Mean `|s - 1|` x the true depth of the CT's landmarks (their mean distance from the
    /// source along the beam), mm: the depth error the scale alone implies.
    pub depth_error_mm: f64,
    /// Pearson correlation of `|s - 1|` with the landmark pose's TRE, image by image.
    pub tre_correlation: f64,
}

/// [`apparent_scale`] needs at least this many landmarks in view.
pub const SCALE_MIN_LANDMARKS: usize = 6;

/// The scale `s` about their centroids that best maps the true landmarks onto the detected ones
/// (least squares over the landmarks in view: `truth[i]` present), or `None` with fewer than
/// [`SCALE_MIN_LANDMARKS`] of them or no spread.
pub fn apparent_scale(truth: &[Option<Point2<f64>>], detected: &[Point2<f64>]) -> Option<f64> {
    let pairs: Vec<(Point2<f64>, Point2<f64>)> = truth
        .iter()
        .zip(detected)
        .filter_map(|(t, d)| t.map(|t| (t, *d)))
        .filter(|(t, d)| t.x.is_finite() && t.y.is_finite() && d.x.is_finite() && d.y.is_finite())
        .collect();
    if pairs.len() < SCALE_MIN_LANDMARKS {
        return None;
    }
    let n = pairs.len() as f64;
    let ct = pairs
        .iter()
        .fold(nalgebra::Vector2::zeros(), |a, (t, _)| a + t.coords)
        / n;
    let cd = pairs
        .iter()
        .fold(nalgebra::Vector2::zeros(), |a, (_, d)| a + d.coords)
        / n;
    let (num, den) = pairs.iter().fold((0.0, 0.0), |(num, den), (t, d)| {
        let (t, d) = (t.coords - ct, d.coords - cd);
        (num + t.dot(&d), den + t.norm_squared())
    });
    (den > 0.0).then(|| num / den)
}

/// Pearson's correlation of two equally long series (NaN when either does not vary).
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()).max(1) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        (sab, saa, sbb) = (
            sab + (x - ma) * (y - mb),
            saa + (x - ma).powi(2),
            sbb + (y - mb).powi(2),
        );
    }
    sab / (saa * sbb).sqrt()
}

/// A landmark further than this from the truth (px at 512 scale) is a gross miss.
pub const MISS_PX: f64 = 20.0;

/// How near the truth (px at 512 scale) a heatmap peak must lie for a missed landmark to count
/// as seen by the network: the consensus decoding's gate
/// ([`consensus::ConsensusOptions::gate_fraction`] at 512).
pub const NEAR_TRUTH_PX: f64 = 15.0;

/// Edges of [`Report::by_angle`]'s bins: degrees from AP.
pub const ANGLE_BINS_DEG: [f64; 8] = [0.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 180.0];

/// The landmark errors of the views in one range of angles from AP.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AngleBin {
    /// The range, degrees from AP: `[from, to)`.
    pub deg: [f64; 2],
    /// Images in it.
    pub images: usize,
    /// Their visible landmarks' errors.
    #[serde(flatten)]
    pub errors: ErrorStats,
}

/// For each `[from, to)` of `edges` that holds an image (`keys`, one per image): its landmark
/// errors (`errors`: `(key of its image, error)`) and its images' indices.
fn bins(
    edges: &[f64],
    errors: &[(f64, f64)],
    keys: &[f64],
) -> Vec<([f64; 2], ErrorStats, Vec<usize>)> {
    edges
        .windows(2)
        .filter_map(|w| {
            let inside = |a: f64| a >= w[0] && a < w[1];
            let e = errors.iter().filter(|(a, _)| inside(*a)).map(|(_, e)| *e);
            let images: Vec<usize> = (0..keys.len()).filter(|&i| inside(keys[i])).collect();
            (!images.is_empty()).then(|| ([w[0], w[1]], ErrorStats::of(e.collect()), images))
        })
        .collect()
}

/// Bins landmark errors (at 512 scale) by their view's angle from AP, degrees.
fn angle_bins(errors: &[(f64, f64)], images: &[f64]) -> Vec<AngleBin> {
    bins(&ANGLE_BINS_DEG, errors, images)
        .into_iter()
        .map(|(deg, errors, i)| AngleBin {
            deg,
            images: i.len(),
            errors,
        })
        .collect()
}

/// Bins landmark errors and poses by their image's score; `tres` holds each image's TRE.
fn score_bins(errors: &[(f64, f64)], scores: &[f64], tres: &[Option<f64>]) -> Vec<ScoreBin> {
    bins(&SCORE_BINS, errors, scores)
        .into_iter()
        .map(|(score, errors, i)| {
            let t: Vec<f64> = i.iter().filter_map(|&k| tres[k]).collect();
            ScoreBin {
                score,
                images: i.len(),
                errors,
                tre_mm: if t.is_empty() {
                    f64::NAN
                } else {
                    t.iter().sum::<f64>() / t.len() as f64
                },
            }
        })
        .collect()
}

/// One image's scores (to find the worst cases).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ImageResult {
    /// The image file.
    pub image: String,
    /// How far its view is turned from AP, degrees.
    #[serde(default)]
    pub angle_from_ap_deg: f64,
    /// RMSE of its visible landmarks at 512 scale (the pose's points with a decoding).
    pub rmse_px: f64,
    /// Each landmark's error at 512 scale, L1..L8 (`None`: not in the image).
    #[serde(default)]
    pub errors_px: [Option<f64>; N_LANDMARKS],
    /// TRE of the landmark pose, mm (`None`: registration failed).
    pub tre_mm: Option<f64>,
    /// RMSE at 512 scale of the CT's landmarks projected at the landmark pose (`None`:
    /// registration failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pose_rmse_px: Option<f64>,
    /// The detected landmarks' apparent scale against the truth, `s - 1` ([`apparent_scale`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_error: Option<f64>,
    /// How well the network read the image ([`crate::detect::polarity_score`]; a network's
    /// reading only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The scored points, in the image's pixels, L1..L8, and their heatmap confidences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub points: Vec<[f64; 3]>,
    /// The CT's landmarks projected at the landmark pose, in the image's pixels (empty when
    /// registration failed; `null` for one the CT lacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pose_points: Vec<Option<[f64; 2]>>,
    /// After refinement against the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refined: Option<RefinedImage>,
}

/// One image's refinement.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct RefinedImage {
    /// TRE after refinement, mm.
    pub tre_mm: f64,
    /// RMSE at 512 scale of the CT's landmarks projected at the refined pose.
    pub rmse_px: f64,
    /// Similarity before and after.
    pub similarity: [f64; 2],
    /// DRRs rendered.
    pub renders: usize,
    /// Restarts tried, and candidates of the scan of views refined (the landmark pose was no
    /// guide).
    #[serde(default)]
    pub restarts: [usize; 2],
    /// The refined pose ([`crate::geometry::Pose::params`]).
    #[serde(default)]
    pub pose: [f64; 6],
}

/// The solved poses refined against the images ([`crate::registration::intensity`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RefinedReport {
    /// Mean TRE after refinement, mm (over the images whose landmark registration succeeded).
    pub tre_mm: f64,
    /// Median TRE after refinement, mm.
    pub tre_median_mm: f64,
    /// The landmark poses' mean TRE on the same images, mm.
    pub tre_before_mm: f64,
    /// Mean rotation error after refinement, degrees.
    pub rotation_error_deg: f64,
    /// Mean translation error (source position) after refinement, mm.
    pub translation_error_mm: f64,
    /// RMSE at 512 scale of the CT's landmarks projected at the refined pose: the landmarks
    /// the whole pipeline shows once the patient's CT has refined the pose.
    pub rmse_px: f64,
    /// Share of images whose pose refinement changed (the rest kept the landmark pose).
    pub changed_rate: f64,
    /// Share of images refined to a TRE under 3 mm.
    #[serde(default)]
    pub under_3mm_rate: f64,
    /// Share of images whose refined DRR is still unlike the frame (similarity under
    /// [`intensity::RESTART_BELOW`]): a refinement the app does not trust.
    #[serde(default)]
    pub unmatched_rate: f64,
    /// Share of images for which the landmark pose and its restarts all ended unlike the frame,
    /// so that the views were scanned ([`intensity::Search`]).
    #[serde(default)]
    pub searched_rate: f64,
    /// Images refined.
    pub images: usize,
    /// DRRs rendered per image, mean.
    pub renders_per_image: f64,
    /// Wall time per refinement, ms, mean.
    pub ms_per_image: f64,
    /// Where the DRRs were rendered (`gpu` or `cpu`).
    pub renderer: String,
}

/// What [`evaluate_with`] measures beyond Table 1.
#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// Refine each solved pose against its image with the subject's CT, and report both.
    pub refine: Option<IntensityOptions>,
    /// Render the refinement's DRRs on the CPU reference even when a GPU works.
    pub cpu: bool,
    /// At most this many images of the split, evenly spaced through it (all when `None`).
    pub limit: Option<usize>,
    /// Keep every image's scores in [`Report::per_image`].
    pub per_image: bool,
    /// Invert each image before anything reads it: bone dark, as many fluoroscopes show it
    /// (to measure [`crate::detect::Polarity`]).
    pub dark: bool,
}

/// Where the landmarks scored come from.
pub enum Landmarks<'a> {
    /// The network's heatmaps: integer and sub-pixel argmax (Table 1).
    Model(&'a UNet),
    /// The network's heatmaps read as [`Decode`] says.
    Decoded(&'a UNet, Decode),
    /// The true projections plus Gaussian noise of this standard deviation per coordinate, in
    /// pixels at 512 scale (seeded): what registration recovers from landmarks of a known
    /// accuracy, i.e. the TRE a perfect detector of that RMSE would reach.
    Oracle {
        /// Per-coordinate sigma, pixels at 512 scale (RMSE = sigma * sqrt 2).
        sigma_px: f64,
        /// Noise seed.
        seed: u64,
    },
}

/// Evaluates `net` on `split` (all when `None`).
pub fn evaluate(
    net: &UNet,
    data: &Dataset,
    split: Option<Split>,
    task: &Task,
) -> Result<Report, crate::train::TrainError> {
    evaluate_landmarks(&Landmarks::Model(net), data, split, task)
}

/// Evaluates the landmarks `from` gives on `split` (all when `None`).
pub fn evaluate_landmarks(
    from: &Landmarks<'_>,
    data: &Dataset,
    split: Option<Split>,
    task: &Task,
) -> Result<Report, crate::train::TrainError> {
    evaluate_with(from, data, split, &EvalOptions::default(), task)
}

/// Evaluates the landmarks `from` gives on `split` (all when `None`), with `opts`.
pub fn evaluate_with(
    from: &Landmarks<'_>,
    data: &Dataset,
    split: Option<Split>,
    opts: &EvalOptions,
    task: &Task,
) -> Result<Report, crate::train::TrainError> {
    let size = data.manifest.size;
    let fused = match from {
        Landmarks::Model(net) | Landmarks::Decoded(net, _) => {
            if net.config.input_size != size {
                return Err(crate::train::TrainError::Invalid(format!(
                    "the model takes {0}x{0} images but the dataset holds {1}x{1}",
                    net.config.input_size, size
                )));
            }
            Some(net.fused()?)
        }
        Landmarks::Oracle { sigma_px, .. } => {
            if !(sigma_px.is_finite() && *sigma_px >= 0.0) {
                return Err(crate::train::TrainError::Invalid(format!(
                    "the oracle's noise must be a non-negative number of pixels, not {sigma_px}"
                )));
            }
            None
        }
    };
    let (oracle_sigma, seed) = match from {
        Landmarks::Oracle { sigma_px, seed } => (*sigma_px, *seed),
        Landmarks::Model(_) | Landmarks::Decoded(..) => (0.0, 0),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut samples: Vec<&Sample> = data.split(split);
    if let Some(n) = opts.limit.filter(|&n| n > 0 && n < samples.len()) {
        let all = std::mem::take(&mut samples);
        samples = (0..n).map(|i| all[i * all.len() / n]).collect();
    }
    if samples.is_empty() {
        return Err(crate::train::TrainError::Invalid(format!(
            "{}: no images in the {} split",
            data.dir.display(),
            split
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_else(|| "whole".into())
        )));
    }
    let scale = 512.0 / size as f64;
    let mut sq = [0.0f64; N_LANDMARKS];
    let mut cnt = [0usize; N_LANDMARKS];
    let mut sq_sub = 0.0;
    let mut tres = Vec::new();
    // Per image with a solved pose and enough landmarks in view: |s - 1|, its depth error, TRE.
    let mut scales: Vec<(f64, f64, f64)> = Vec::new();
    // (angle from AP, error at 512 scale) of every visible landmark, and every image's angle.
    let (mut angled_errors, mut angles) = (Vec::new(), Vec::new());
    let (mut other_peak, mut reprojected, mut decoded_landmarks) = (0usize, 0usize, 0usize);
    let mut inverted_images = 0usize;
    let mut noise = Vec::new();
    // Misses (over MISS_PX) whose heatmap had a peak near the truth, and those without.
    let (mut misses_seen, mut misses_unseen) = (0usize, 0usize);
    // Squared error and landmark count on the images the network is unsure of, and on the rest.
    let (mut unsure_images, mut unsure_sq, mut rest_sq) = (0usize, (0.0, 0usize), (0.0, 0usize));
    // Each landmark error with its image's score, and each image's score and TRE.
    let (mut scored_errors, mut image_scores, mut image_tres) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut rot, mut trans, mut failures) = (0.0, 0.0, 0usize);
    let (mut pose_sq, mut pose_n) = (0.0, 0usize);
    let mut per_image = Vec::new();
    let mut refiner = opts
        .refine
        .as_ref()
        .map(|o| Refiner::new(o.clone(), opts.cpu));
    task.set_total(samples.len() as u64);
    task.set_done(0);
    for chunk in samples.chunks(8) {
        if task.is_cancelled() {
            return Err(Cancelled.into());
        }
        let logits = match &fused {
            Some(net) => {
                let mut images = Vec::with_capacity(chunk.len());
                for s in chunk {
                    let img = data.image(s)?;
                    images.push(if opts.dark {
                        crate::detect::as_read(&img, true).into_owned()
                    } else {
                        img
                    });
                }
                let decode = match from {
                    Landmarks::Decoded(_, d) => *d,
                    _ => Decode::default(),
                };
                let read = read_batch(net, &images, size, &decode)?;
                inverted_images += read.inverted.iter().filter(|&&i| i).count();
                noise.extend(read.noise);
                Some(read.logits)
            }
            None => None,
        };
        for (b, s) in chunk.iter().enumerate() {
            let subject = &data.manifest.subjects[s.subject];
            // The CT's landmarks (`pts3`, `None` where the scan lacks one) and those it holds.
            let pts3 = subject.points3d();
            let p3 = subject.present3d();
            let mut decoded = None;
            // The consistent decoding's peaks, for the misses' breakdown.
            let mut peaks = None;
            let (int, sub) = match (&logits, from) {
                (
                    Some(logits),
                    Landmarks::Decoded(
                        _,
                        Decode {
                            consensus: Some(opts),
                            ..
                        },
                    ),
                ) => {
                    let l = logits.get(b)?;
                    let cands = heatmap::candidates(&l, &peak_search(size, opts))?;
                    let c = consensus::decode(&data.manifest.camera, &pts3, &cands, None, opts);
                    for o in &c.origin {
                        match o {
                            consensus::Origin::Peak(0) => {}
                            consensus::Origin::Peak(_) => other_peak += 1,
                            consensus::Origin::Reprojected => reprojected += 1,
                        }
                    }
                    decoded_landmarks += c.origin.len();
                    decoded = Some(c.solution);
                    peaks = Some(cands);
                    // The decoded points are sub-pixel: they stand for both argmaxes.
                    (c.detections.clone(), c.detections)
                }
                (Some(logits), _) => {
                    let l = logits.get(b)?;
                    (heatmap::argmax(&l)?, heatmap::argmax_subpixel(&l)?)
                }
                (None, _) => {
                    let sigma = oracle_sigma / scale;
                    let noisy: Vec<(Point2<f64>, f64)> = s
                        .projected
                        .iter()
                        .map(|p| {
                            let n: [f64; 2] = [
                                rng.sample(rand_distr::StandardNormal),
                                rng.sample(rand_distr::StandardNormal),
                            ];
                            // Not in the CT: nothing to find (and no 3D point to solve with).
                            p.map_or((Point2::origin(), 0.0), |[x, y]| {
                                (Point2::new(x + sigma * n[0], y + sigma * n[1]), 1.0)
                            })
                        })
                        .collect();
                    (noisy.clone(), noisy)
                }
            };
            let (mut image_sq, mut image_n) = (0.0, 0usize);
            let mut image_errors = [None; N_LANDMARKS];
            let angle = crate::geometry::sampling::angle_from_ap_rad(&s.pose()).to_degrees();
            angles.push(angle);
            for i in 0..N_LANDMARKS {
                if let Some([x, y]) = s.landmarks[i] {
                    let d =
                        |p: Point2<f64>| ((p.x - x).powi(2) + (p.y - y).powi(2)) * scale * scale;
                    sq[i] += d(int[i].0);
                    sq_sub += d(sub[i].0);
                    angled_errors.push((angle, d(int[i].0).sqrt()));
                    image_errors[i] = Some(d(int[i].0).sqrt());
                    cnt[i] += 1;
                    image_sq += d(int[i].0);
                    image_n += 1;
                }
            }
            // Only a network's confidences say anything (the oracle's are all 1).
            let score = logits
                .is_some()
                .then(|| crate::detect::polarity_score(int.iter().map(|(_, c)| *c)));
            if let Some(sc) = score {
                let bucket = if sc < crate::detect::UNSURE_BELOW {
                    unsure_images += 1;
                    &mut unsure_sq
                } else {
                    &mut rest_sq
                };
                bucket.0 += image_sq;
                bucket.1 += image_n;
                scored_errors.extend(image_errors.iter().flatten().map(|e| (sc, *e)));
                image_scores.push(sc);
            }
            let missed: Vec<usize> = (0..N_LANDMARKS)
                .filter(|&i| image_errors[i].is_some_and(|e| e > MISS_PX))
                .collect();
            if let (Some(logits), false) = (&logits, missed.is_empty()) {
                let peaks = match peaks {
                    Some(p) => p,
                    None => heatmap::candidates(
                        &logits.get(b)?,
                        &peak_search(size, &consensus::ConsensusOptions::default()),
                    )?,
                };
                for i in missed {
                    let Some([x, y]) = s.landmarks[i] else {
                        continue;
                    };
                    if peak_near(&peaks[i], Point2::new(x, y), scale) {
                        misses_seen += 1;
                    } else {
                        misses_unseen += 1;
                    }
                }
            }
            let mut record = ImageResult {
                image: s.image.clone(),
                angle_from_ap_deg: angle,
                rmse_px: (image_sq / image_n.max(1) as f64).sqrt(),
                errors_px: image_errors,
                score,
                points: if opts.per_image {
                    int.iter().map(|(p, c)| [p.x, p.y, *c]).collect()
                } else {
                    Vec::new()
                },
                ..ImageResult::default()
            };
            let sol = decoded
                .unwrap_or_else(|| solve_detections(&data.manifest.camera, &pts3, &sub, None));
            if sol.status.ok() {
                let truth = s.pose();
                tres.push(metrics::mean_tre_mm(&sol.pose, &truth, &p3));
                record.tre_mm = tres.last().copied();
                let detected: Vec<Point2<f64>> = int.iter().map(|(p, _)| *p).collect();
                if let Some(sc) = apparent_scale(&s.points(), &detected) {
                    let depth = p3.iter().map(|p| truth.camera_from_world(p).z).sum::<f64>()
                        / p3.len().max(1) as f64;
                    let e = (sc - 1.0).abs();
                    scales.push((e, e * depth, tres[tres.len() - 1]));
                    record.scale_error = Some(sc - 1.0);
                }
                let (sq, n) = reprojection_sq(&data.manifest.camera, &sol.pose, &pts3, s, scale);
                (pose_sq, pose_n) = (pose_sq + sq, pose_n + n);
                record.pose_rmse_px = Some((sq / n.max(1) as f64).sqrt());
                if opts.per_image {
                    record.pose_points = pts3
                        .iter()
                        .map(|p| {
                            p.map(|p| {
                                let u = data.manifest.camera.project(&sol.pose, &p);
                                [u.x, u.y]
                            })
                        })
                        .collect();
                }
                if let Some(r) = refiner.as_mut() {
                    record.refined = Some(r.refine(data, s, &sol.pose)?);
                }
                rot += metrics::rotation_error_deg(&sol.pose, &truth);
                trans += metrics::translation_error_mm(&sol.pose, &truth);
            } else {
                failures += 1;
            }
            if score.is_some() {
                image_tres.push(record.tre_mm);
            }
            if opts.per_image {
                per_image.push(record);
            }
            task.inc(1);
        }
    }
    let mut rmse = serde_json::Map::new();
    let total: usize = cnt.iter().sum();
    // Nothing to measure (a landmark the CT lacks, no registration that worked) is NaN: `null`
    // in the JSON, "-" in the tables, not a perfect 0.
    let rms = |sum: f64, n: usize| {
        if n == 0 {
            f64::NAN
        } else {
            (sum / n as f64).sqrt()
        }
    };
    let mean_of = |sum: f64, n: usize| if n == 0 { f64::NAN } else { sum / n as f64 };
    rmse.insert("mean".into(), rms(sq.iter().sum(), total).into());
    for i in 0..N_LANDMARKS {
        rmse.insert(format!("L{}", i + 1), rms(sq[i], cnt[i]).into());
    }
    let mut errors: Vec<f64> = angled_errors.iter().map(|(_, e)| *e).collect();
    // The gross misses' count and the squared error they and the hits each carry.
    let (misses, miss_sq, hit_sq) = errors.iter().fold((0usize, 0.0, 0.0), |(n, m, h), e| {
        if *e > MISS_PX {
            (n + 1, m + e * e, h)
        } else {
            (n, m, h + e * e)
        }
    });
    let mut sorted = tres.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(Report {
        split: split.map_or("all".into(), |s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        }),
        images: samples.len(),
        rmse_px: rmse,
        rmse_subpixel_px: rms(sq_sub, total),
        tre_mm: mean_of(tres.iter().sum(), tres.len()),
        tre_median_mm: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        rotation_error_deg: mean_of(rot, tres.len()),
        translation_error_mm: mean_of(trans, tres.len()),
        registration_failures: failures,
        pose_rmse_px: rms(pose_sq, pose_n),
        median_error_px: median(&mut errors),
        miss_rate: misses as f64 / errors.len().max(1) as f64,
        miss_error_share: miss_sq / (miss_sq + hit_sq).max(f64::MIN_POSITIVE),
        rmse_hits_px: (hit_sq / (errors.len() - misses).max(1) as f64).sqrt(),
        misses_with_peak_rate: (misses_seen + misses_unseen > 0)
            .then(|| misses_seen as f64 / (misses_seen + misses_unseen) as f64),
        other_peak_rate: other_peak as f64 / decoded_landmarks.max(1) as f64,
        reprojected_rate: reprojected as f64 / decoded_landmarks.max(1) as f64,
        refined: refiner.map(Refiner::report),
        per_image,
        inverted_rate: inverted_images as f64 / samples.len().max(1) as f64,
        by_angle: angle_bins(&angled_errors, &angles),
        unsure: fused.is_some().then(|| UnsureReport {
            rate: unsure_images as f64 / samples.len().max(1) as f64,
            rmse_px: rms(unsure_sq.0, unsure_sq.1),
            rmse_rest_px: rms(rest_sq.0, rest_sq.1),
        }),
        input_noise: NoiseReport::of(&noise),
        by_score: score_bins(&scored_errors, &image_scores, &image_tres),
        apparent_scale: (!scales.is_empty()).then(|| {
            let n = scales.len() as f64;
            let mut e: Vec<f64> = scales.iter().map(|x| x.0).collect();
            let t: Vec<f64> = scales.iter().map(|x| x.2).collect();
            ScaleReport {
                images: scales.len(),
                mean_error: e.iter().sum::<f64>() / n,
                depth_error_mm: scales.iter().map(|x| x.1).sum::<f64>() / n,
                tre_correlation: correlation(&e, &t),
                median_error: median(&mut e),
            }
        }),
    })
}

/// Whether one of a heatmap's `peaks` lies within [`NEAR_TRUTH_PX`] (at 512 scale; `scale` =
/// 512 / image size) of the true landmark.
fn peak_near(peaks: &heatmap::Peaks, truth: Point2<f64>, scale: f64) -> bool {
    peaks
        .iter()
        .any(|(p, _)| (p - truth).norm() * scale <= NEAR_TRUTH_PX)
}

/// Squared distances at 512 scale (`scale` = 512 / dataset size), summed, between the CT's
/// landmarks `p3` projected at `pose` and the visible true landmarks of `s`, and how many.
fn reprojection_sq(
    camera: &crate::geometry::Camera,
    pose: &crate::geometry::Pose,
    p3: &[Option<nalgebra::Point3<f64>>],
    s: &Sample,
    scale: f64,
) -> (f64, usize) {
    let mut sum = (0.0, 0usize);
    for (p, truth) in p3.iter().zip(&s.landmarks) {
        let (Some(p), Some([x, y])) = (p, *truth) else {
            continue;
        };
        // Behind the source nothing projects: count it as far off as the image is wide.
        let d2 = camera
            .project_in_front(pose, p)
            .map_or(512.0f64.powi(2), |u| {
                ((u.x - x).powi(2) + (u.y - y).powi(2)) * scale * scale
            });
        sum = (sum.0 + d2, sum.1 + 1);
    }
    sum
}

/// A batch of images as the network read them ([`read_batch`]).
struct BatchRead {
    /// The heatmap logits, `(B, N, S, S)`.
    logits: Tensor,
    /// Which images were read inverted.
    inverted: Vec<bool>,
    /// How noisy each image was, as first read (inverting does not change it).
    noise: Vec<crate::model::noise::InputNoise>,
}

/// A batch of `size x size` images read as `decode` says (mirror-averaged, and which way round:
/// [`Polarity`], as [`crate::detect::detect`] reads a frame).
fn read_batch(
    net: &UNet,
    images: &[Vec<f32>],
    size: usize,
    decode: &Decode,
) -> Result<BatchRead, crate::train::TrainError> {
    let forward =
        |inverted: &[bool]| -> candle_core::Result<(Tensor, Vec<crate::model::noise::InputNoise>)> {
            let mut v = Vec::with_capacity(images.len() * size * size);
            let mut noise = Vec::with_capacity(images.len());
            for (img, &inv) in images.iter().zip(inverted) {
                let read = crate::detect::as_read(img, inv).into_owned();
                let (input, n) = crate::model::normalised_input(
                    &net.config.normalisation,
                    read,
                    size,
                    decode.views.denoise,
                );
                v.extend(input);
                noise.push(n);
            }
            let x = Tensor::from_vec(v, (images.len(), 1, size, size), net.device())?;
            Ok((net.forward_views(&x, &decode.views)?, noise))
        };
    let mut inverted = vec![decode.first_inverted(); images.len()];
    let (logits, noise) = forward(&inverted)?;
    if decode.polarity != Polarity::Auto {
        return Ok(BatchRead {
            logits,
            inverted,
            noise,
        });
    }
    let score = |l: &Tensor| -> candle_core::Result<f64> {
        Ok(polarity_score(
            heatmap::argmax(l)?.into_iter().map(|(_, c)| c),
        ))
    };
    let scores = (0..images.len())
        .map(|i| score(&logits.get(i)?))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    if !scores.iter().any(|&s| decode.retries(s)) {
        return Ok(BatchRead {
            logits,
            inverted,
            noise,
        });
    }
    let flipped: Vec<bool> = inverted.iter().map(|v| !v).collect();
    let (other, _) = forward(&flipped)?;
    let mut rows = Vec::with_capacity(images.len());
    for (i, s) in scores.iter().enumerate() {
        let o = other.get(i)?;
        if decode.retries(*s) && score(&o)? > *s {
            rows.push(o);
            inverted[i] = !inverted[i];
        } else {
            rows.push(logits.get(i)?);
        }
    }
    Ok(BatchRead {
        logits: Tensor::stack(&rows, 0)?,
        inverted,
        noise,
    })
}

/// Intensity-based refinement inside [`evaluate_with`]: one subject's CT at a time.
struct Refiner {
    opts: IntensityOptions,
    source: AnyDrr,
    subject: Option<usize>,
    /// One record per refined image; the report is derived from them.
    done: Vec<Refined>,
}

/// What one refinement scored: the per-image record plus what only the report needs.
struct Refined {
    image: RefinedImage,
    tre_before_mm: f64,
    rotation_error_deg: f64,
    translation_error_mm: f64,
    changed: bool,
    /// Squared reprojection errors summed (px² at 512 scale) and how many landmarks.
    sq_px: f64,
    landmarks: usize,
    seconds: f64,
}

impl Refiner {
    fn new(opts: IntensityOptions, cpu: bool) -> Self {
        Self {
            opts,
            source: AnyDrr::new(cpu),
            subject: None,
            done: Vec::new(),
        }
    }

    fn refine(
        &mut self,
        data: &Dataset,
        s: &Sample,
        pose: &crate::geometry::Pose,
    ) -> Result<RefinedImage, crate::train::TrainError> {
        let subject = &data.manifest.subjects[s.subject];
        if self.subject != Some(s.subject) {
            let vol = subject.volume()?;
            self.source
                .set_volume(std::sync::Arc::new(DensityVolume::from_volume(
                    &vol,
                    Attenuation::default(),
                )));
            self.subject = Some(s.subject);
        }
        let pts3 = subject.points3d();
        let p3 = subject.present3d();
        let frame = data.image(s)?;
        let t0 = std::time::Instant::now();
        let r = intensity::refine(
            &frame,
            &data.manifest.camera,
            &intensity::centroid(&p3),
            pose,
            &mut self.source,
            &self.opts,
        )
        .map_err(|e| crate::train::TrainError::Invalid(format!("{}: {e}", s.image)))?;
        let seconds = t0.elapsed().as_secs_f64();
        let truth = s.pose();
        let scale = 512.0 / data.manifest.size as f64;
        let (sq_px, landmarks) = reprojection_sq(&data.manifest.camera, &r.pose, &pts3, s, scale);
        let image = RefinedImage {
            tre_mm: metrics::mean_tre_mm(&r.pose, &truth, &p3),
            rmse_px: (sq_px / landmarks.max(1) as f64).sqrt(),
            similarity: [r.similarity_before, r.similarity],
            renders: r.renders,
            restarts: [r.restarts, r.searched],
            pose: r.pose.params(),
        };
        self.done.push(Refined {
            image,
            tre_before_mm: metrics::mean_tre_mm(pose, &truth, &p3),
            rotation_error_deg: metrics::rotation_error_deg(&r.pose, &truth),
            translation_error_mm: metrics::translation_error_mm(&r.pose, &truth),
            changed: r.pose != *pose,
            sq_px,
            landmarks,
            seconds,
        });
        Ok(image)
    }

    fn report(self) -> RefinedReport {
        let n = self.done.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Refined) -> f64| self.done.iter().map(f).sum::<f64>() / n;
        let mut tres: Vec<f64> = self.done.iter().map(|d| d.image.tre_mm).collect();
        let sq: f64 = self.done.iter().map(|d| d.sq_px).sum();
        let landmarks: usize = self.done.iter().map(|d| d.landmarks).sum();
        RefinedReport {
            tre_mm: mean(&|d| d.image.tre_mm),
            tre_median_mm: median(&mut tres),
            tre_before_mm: mean(&|d| d.tre_before_mm),
            rmse_px: (sq / landmarks.max(1) as f64).sqrt(),
            rotation_error_deg: mean(&|d| d.rotation_error_deg),
            translation_error_mm: mean(&|d| d.translation_error_mm),
            changed_rate: mean(&|d| f64::from(u8::from(d.changed))),
            under_3mm_rate: mean(&|d| f64::from(u8::from(d.image.tre_mm < 3.0))),
            unmatched_rate: mean(&|d| {
                f64::from(u8::from(d.image.similarity[1] < intensity::RESTART_BELOW))
            }),
            searched_rate: mean(&|d| f64::from(u8::from(d.image.restarts[1] > 0))),
            images: self.done.len(),
            renders_per_image: mean(&|d| d.image.renders as f64),
            ms_per_image: 1000.0 * mean(&|d| d.seconds),
            renderer: if self.source.on_gpu() { "gpu" } else { "cpu" }.into(),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A table cell: `v` to `prec` decimals, or "-" when there was nothing to measure (NaN).
pub fn cell(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

/// A CSV field: `v` to 4 decimals, or empty when there was nothing to measure.
fn field(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.4}")
    } else {
        String::new()
    }
}

/// Table 1 rows as markdown: one row per (model, split).
pub fn markdown(rows: &[(String, Report)]) -> String {
    // With refinement (any row), its TRE joins as one more column.
    let refined = rows.iter().any(|(_, r)| r.refined.is_some());
    let mut s = String::from(
        "| model | split | images | mean | L1 | L2 | L3 | L4 | L5 | L6 | L7 | L8 | sub-px mean | median px | misses >20 px | TRE mm | rot deg | trans mm |",
    );
    s.push_str(if refined { " TRE refined mm |\n" } else { "\n" });
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    s.push_str(if refined { "---|\n" } else { "\n" });
    for (name, r) in rows {
        let g = |k: &str| {
            r.rmse_px
                .get(k)
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        };
        s.push_str(&format!(
            "| {name} | {} | {} | {} |",
            r.split,
            r.images,
            cell(g("mean"), 2)
        ));
        for i in 1..=N_LANDMARKS {
            s.push_str(&format!(" {} |", cell(g(&format!("L{i}")), 2)));
        }
        s.push_str(&format!(
            " {} | {} | {:.1}% | {} | {} | {} |",
            cell(r.rmse_subpixel_px, 2),
            cell(r.median_error_px, 2),
            100.0 * r.miss_rate,
            cell(r.tre_mm, 2),
            cell(r.rotation_error_deg, 2),
            cell(r.translation_error_mm, 2)
        ));
        match (&r.refined, refined) {
            (Some(f), _) => s.push_str(&format!(" {} |\n", cell(f.tre_mm, 2))),
            (None, true) => s.push_str(" - |\n"),
            (None, false) => s.push('\n'),
        }
    }
    s
}

/// Table 1 rows as CSV.
pub fn csv(rows: &[(String, Report)]) -> String {
    let mut s = String::from("model,split,images,mean");
    for i in 1..=N_LANDMARKS {
        s.push_str(&format!(",L{i}"));
    }
    s.push_str(
        ",rmse_subpixel_px,median_error_px,miss_rate,tre_mm,rotation_error_deg,translation_error_mm,tre_refined_mm\n",
    );
    for (name, r) in rows {
        let g = |k: &str| {
            r.rmse_px
                .get(k)
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        };
        s.push_str(&format!(
            "{name},{},{},{}",
            r.split,
            r.images,
            field(g("mean"))
        ));
        for i in 1..=N_LANDMARKS {
            s.push_str(&format!(",{}", field(g(&format!("L{i}")))));
        }
        s.push_str(&format!(
            ",{},{},{},{},{},{},{}\n",
            field(r.rmse_subpixel_px),
            field(r.median_error_px),
            field(r.miss_rate),
            field(r.tre_mm),
            field(r.rotation_error_deg),
            field(r.translation_error_mm),
            r.refined
                .as_ref()
                .map_or(String::new(), |f| field(f.tre_mm))
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constellation scaled about any centre and moved reads as that scale; a pelvis moved 1%
    /// further from the source looks 1% smaller (the depth the scale stands for); too few
    /// landmarks in view, or NaN detections among them, give no scale.
    #[test]
    fn apparent_scale_is_the_constellations_size() {
        use crate::geometry::{Camera, Pose};
        use nalgebra::{Point3, Vector3};
        let truth: Vec<Option<Point2<f64>>> = [
            (40.0, 120.0),
            (100.0, 170.0),
            (110.0, 150.0),
            (128.0, 150.0),
            (128.0, 175.0),
            (146.0, 150.0),
            (156.0, 170.0),
            (216.0, 120.0),
        ]
        .iter()
        .map(|&(x, y)| Some(Point2::new(x, y)))
        .collect();
        let centre = nalgebra::Vector2::new(90.0, 200.0);
        let detected: Vec<Point2<f64>> = truth
            .iter()
            .flatten()
            .map(|t| {
                Point2::from(
                    centre + (t.coords - centre) * 1.02 + nalgebra::Vector2::new(3.0, -2.0),
                )
            })
            .collect();
        let s = apparent_scale(&truth, &detected).unwrap();
        assert!((s - 1.02).abs() < 1e-12, "{s}");
        // One landmark out of view: the other seven still say 1.02.
        let mut seven = truth.clone();
        seven[0] = None;
        assert!((apparent_scale(&seven, &detected).unwrap() - 1.02).abs() < 1e-12);
        // A NaN detection drops out; five left are too few.
        let mut nan = detected.clone();
        nan[1] = Point2::new(f64::NAN, 0.0);
        nan[2] = Point2::new(0.0, f64::NAN);
        assert!(apparent_scale(&seven, &nan).is_none());
        assert!(apparent_scale(&truth, &nan).is_some());

        // The pelvis 800 mm from the source, then 1% further.
        let cam = Camera::paper(256);
        let pts: Vec<Point3<f64>> = (0..8)
            .map(|i| {
                let a = i as f64 * 0.8;
                Point3::new(110.0 * a.cos(), 60.0 * a.sin(), 30.0 * (a * 1.7).sin())
            })
            .collect();
        let view = |z: f64| -> Vec<Point2<f64>> {
            let pose = Pose::new(Vector3::new(0.05, -0.1, 0.02), Vector3::new(5.0, -8.0, z));
            pts.iter().map(|p| cam.project(&pose, p)).collect()
        };
        let near: Vec<Option<Point2<f64>>> = view(800.0).into_iter().map(Some).collect();
        let s = apparent_scale(&near, &view(808.0)).unwrap();
        assert!((s - 1.0 / 1.01).abs() < 2e-3, "{s}");
    }

    #[test]
    fn a_miss_counts_as_seen_only_with_a_peak_near_the_truth() {
        let truth = Point2::new(100.0, 50.0);
        // At 256 (scale 2), 15 px at 512 is 7.5 image pixels.
        let far = vec![(Point2::new(140.0, 50.0), 0.9)];
        assert!(!peak_near(&far, truth, 2.0));
        assert!(!peak_near(&Vec::new(), truth, 2.0));
        let weaker_near = vec![far[0], (Point2::new(100.0, 57.0), 0.1)];
        assert!(peak_near(&weaker_near, truth, 2.0));
        // The same offset is too far at 128 (scale 4: 28 px at 512).
        assert!(!peak_near(&weaker_near, truth, 4.0));
    }
}
