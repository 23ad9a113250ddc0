//! Frame -> landmarks -> pose: the network's heatmaps read as the user chose, beyond the
//! paper's argmax, and the pose solved from them. The app's pipeline and `fluoropose predict`
//! run this; `fluoropose eval` runs the same [`Decode`] on batches.

use crate::geometry::{Camera, Pose};
use crate::model::{Detection, ModelError, Predictor, heatmap};
use crate::registration::consensus::{self, ConsensusOptions, Origin};
use crate::registration::{Solution, solve_detections};
use nalgebra::Point3;

/// Peaks per heatmap the pose-consistent decoding chooses among.
pub const CANDIDATES: usize = 3;

/// Least distance between two of a heatmap's peaks, as a fraction of the image width (13 px at
/// 256): closer maxima are ripples of one peak.
pub const CANDIDATE_SEPARATION: f64 = 0.05;

/// The peaks the pose-consistent decoding `opts` chooses among, on a model input of
/// `input_size` pixels: weaker peaks below its confidence floor are not worth finding.
pub fn peak_search(input_size: usize, opts: &ConsensusOptions) -> heatmap::PeakSearch {
    heatmap::PeakSearch {
        k: CANDIDATES,
        min_separation_px: CANDIDATE_SEPARATION * input_size as f64,
        min_probability: opts.min_confidence,
    }
}

/// How heatmaps become points.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decode {
    /// Average the heatmaps of the image and of its mirror image
    /// ([`crate::model::UNet::forward_mirrored`]): twice the inference time.
    pub mirror: bool,
    /// Choose among each heatmap's peaks those that agree with one pose of the CT's landmarks
    /// ([`consensus`]); a landmark none agrees with is reprojected. `None`: the argmax.
    pub consensus: Option<ConsensusOptions>,
}

impl Decode {
    /// The decoding the app and `predict` use unless told otherwise: mirror-averaged heatmaps
    /// and pose-consistent peaks (see the model card for what each adds).
    pub fn recommended() -> Self {
        Self {
            mirror: true,
            consensus: Some(ConsensusOptions::default()),
        }
    }
}

/// What [`detect`] finds on a frame.
#[derive(Clone, Debug)]
pub struct Found {
    /// The landmarks, in frame pixels.
    pub detections: Vec<Detection>,
    /// The pose, when the CT's landmarks were given.
    pub solution: Option<Solution>,
    /// Network and heatmap reading, ms.
    pub inference_ms: f64,
    /// Decoding against the pose and solving, ms.
    pub pose_ms: f64,
}

/// Finds the landmarks on a `width x height` frame and, given the CT's 3D landmarks, solves the
/// pose (from `init`, the previous frame's pose, when given).
#[allow(clippy::too_many_arguments)]
pub fn detect(
    predictor: &Predictor,
    pixels: &[f32],
    width: usize,
    height: usize,
    camera: &Camera,
    points3d: Option<&[Option<Point3<f64>>]>,
    init: Option<&Pose>,
    decode: &Decode,
) -> Result<Found, ModelError> {
    let t0 = std::time::Instant::now();
    let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
    if let (Some(opts), Some(p3)) = (&decode.consensus, points3d) {
        let search = peak_search(predictor.config.input_size, opts);
        let cands = predictor.candidates(pixels, width, height, decode.mirror, &search)?;
        let inference_ms = ms(t0);
        let t1 = std::time::Instant::now();
        let c = consensus::decode(camera, p3, &cands, init, opts);
        let detections = c
            .detections
            .iter()
            .zip(&c.origin)
            .map(|(&(point, confidence), o)| Detection {
                point,
                confidence,
                reprojected: *o == Origin::Reprojected,
            })
            .collect();
        return Ok(Found {
            detections,
            solution: Some(c.solution),
            inference_ms,
            pose_ms: ms(t1),
        });
    }
    let detections = predictor.predict_with(pixels, width, height, decode.mirror)?;
    let inference_ms = ms(t0);
    let t1 = std::time::Instant::now();
    let solution = points3d.map(|p3| {
        let d: Vec<_> = detections.iter().map(|d| (d.point, d.confidence)).collect();
        solve_detections(camera, p3, &d, init)
    });
    Ok(Found {
        detections,
        solution,
        inference_ms,
        pose_ms: ms(t1),
    })
}
