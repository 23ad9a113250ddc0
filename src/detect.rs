//! Frame -> landmarks -> pose: the network's heatmaps read as the user chose, beyond the
//! paper's argmax, and the pose solved from them. The app's pipeline and `fluoropose predict`
//! run this; `fluoropose eval` runs the same [`Decode`] on batches.

use crate::geometry::{Camera, Pose};
use crate::model::noise::InputNoise;
use crate::model::{Detection, ModelError, Predictor, Views, heatmap};
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

/// Which way round a frame's grey levels are. The network learnt DRRs, where bone is bright as
/// in radiographs; fluoroscopy and angiography often store or show bone dark, and on such a
/// frame the network finds nothing (mean confidence ~0.01 on inverted DRRs, against 0.9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Polarity {
    /// As stored: bone bright.
    #[default]
    AsIs,
    /// Inverted before the network: bone dark.
    Inverted,
    /// Whichever of the two the network reads more confidently ([`Found::polarity_score`]):
    /// the other is tried when the first one scores under [`AUTO_RETRY_BELOW`].
    Auto,
}

impl Polarity {
    /// For menus and messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::AsIs => "as stored (bone bright)",
            Self::Inverted => "inverted (bone dark)",
            Self::Auto => "automatic",
        }
    }

    /// Parses `auto`, `as-is` or `inverted`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "as-is" => Some(Self::AsIs),
            "inverted" => Some(Self::Inverted),
            _ => None,
        }
    }
}

/// A frame's pixels as the network reads them: negated when it was read inverted (negation
/// inverts it: the quantile normalisation maps it to 1 - x). Datasets store frames this way,
/// so that training sees bone bright whatever the source showed.
pub fn as_read(pixels: &[f32], inverted: bool) -> std::borrow::Cow<'_, [f32]> {
    if inverted {
        std::borrow::Cow::Owned(pixels.iter().map(|v| -v).collect())
    } else {
        std::borrow::Cow::Borrowed(pixels)
    }
}

/// With [`Polarity::Auto`], a frame whose [`Found::polarity_score`] is under this is read the
/// other way round too. Mean confidences of well-read frames of the held-out phantoms are
/// 0.85-0.99, of inverted ones 0.00-0.15.
pub const AUTO_RETRY_BELOW: f64 = 0.5;

/// A frame whose [`polarity_score`] is under this is one the network is unsure of: its landmarks,
/// and the pose from them, may be wrong. On the 80 held-out phantoms of h80 (the model card's
/// "Real anatomy", `eval`'s errors by score) 22 of 2,025 frames score under it, with a landmark
/// RMSE of 41 px and a mean TRE of 100-130 mm against 4.7 px and 13 mm for the 89% that score
/// 0.99 or more; d45's four held-out subjects, 1 of 400. DRRs of the real CT beside the project,
/// anatomy the network never saw, score under it on 92-98 of 100.
pub const UNSURE_BELOW: f64 = 0.9;

/// Whether the network is unsure of a frame whose landmarks have these confidences.
pub fn unsure(confidences: impl Iterator<Item = f64>) -> bool {
    polarity_score(confidences) < UNSURE_BELOW
}

/// How heatmaps become points.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decode {
    /// The views of the frame whose heatmaps are averaged ([`crate::model::UNet::forward_views`]):
    /// each view is one more network input per frame.
    pub views: Views,
    /// Choose among each heatmap's peaks those that agree with one pose of the CT's landmarks
    /// ([`consensus`]); a landmark none agrees with is reprojected. `None`: the argmax.
    pub consensus: Option<ConsensusOptions>,
    /// Which way round the frame is read.
    pub polarity: Polarity,
    /// With [`Polarity::Auto`], try the frame inverted first (a stream's previous frame was).
    pub inverted_first: bool,
}

impl Decode {
    /// The decoding `predict` uses unless told otherwise, and the app where the moved views
    /// fit a live stream ([`Views::shifts_fit_live`]): heatmaps averaged over the frame, its
    /// mirror image and two shifted copies, and pose-consistent peaks (see the model card for
    /// what each adds).
    pub fn recommended() -> Self {
        Self {
            views: Views::recommended(),
            consensus: Some(ConsensusOptions::default()),
            polarity: Polarity::Auto,
            inverted_first: false,
        }
    }

    /// Whether a frame is read inverted first.
    pub fn first_inverted(&self) -> bool {
        match self.polarity {
            Polarity::AsIs => false,
            Polarity::Inverted => true,
            Polarity::Auto => self.inverted_first,
        }
    }

    /// Whether a frame whose first reading scored `score` ([`polarity_score`]) is read the
    /// other way round too.
    pub fn retries(&self, score: f64) -> bool {
        self.polarity == Polarity::Auto && score < AUTO_RETRY_BELOW
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
    /// The frame was read inverted ([`Polarity`]).
    pub inverted: bool,
    /// How noisy the frame was to the network, and how much it was smoothed first.
    pub noise: InputNoise,
}

impl Found {
    /// Mean confidence of the landmarks (0 without any).
    pub fn mean_confidence(&self) -> f64 {
        let n = self.detections.len().max(1) as f64;
        self.detections.iter().map(|d| d.confidence).sum::<f64>() / n
    }

    /// How well the network read the frame, to choose its polarity by ([`polarity_score`]).
    pub fn polarity_score(&self) -> f64 {
        polarity_score(self.detections.iter().map(|d| d.confidence))
    }

    /// Whether the network is unsure of the frame ([`UNSURE_BELOW`]).
    pub fn unsure(&self) -> bool {
        unsure(self.detections.iter().map(|d| d.confidence))
    }
}

/// How well the network read a frame, from its landmarks' confidences: the mean of the more
/// confident half (at a steep view some landmarks are out of the image, rightly faint, and
/// should not make a well-read frame look misread).
pub fn polarity_score(confidences: impl Iterator<Item = f64>) -> f64 {
    let mut c: Vec<f64> = confidences.collect();
    c.sort_by(|a, b| b.total_cmp(a));
    let half = c.len().div_ceil(2).max(1);
    c.iter().take(half).sum::<f64>() / half as f64
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
    let read = |inverted: bool| {
        let px = as_read(pixels, inverted);
        let mut f = detect_as_stored(
            predictor, &px, width, height, camera, points3d, init, decode,
        )?;
        f.inverted = inverted;
        Ok::<_, ModelError>(f)
    };
    let first = decode.first_inverted();
    let found = read(first)?;
    if !decode.retries(found.polarity_score()) {
        return Ok(found);
    }
    let other = read(!first)?;
    let (mut best, rest) = if other.polarity_score() > found.polarity_score() {
        (other, found)
    } else {
        (found, other)
    };
    // Both readings' time is the frame's.
    best.inference_ms += rest.inference_ms;
    best.pose_ms += rest.pose_ms;
    Ok(best)
}

/// [`detect`] on the frame's grey levels as they are.
#[allow(clippy::too_many_arguments)]
fn detect_as_stored(
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
        let (cands, noise) = predictor.candidates(pixels, width, height, &decode.views, &search)?;
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
            inverted: false,
            noise,
        });
    }
    let (detections, noise) = predictor.predict_with(pixels, width, height, &decode.views)?;
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
        inverted: false,
        noise,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-read frame is sure even with landmarks out of view (faint, rightly); a frame whose
    /// best half is faint is not (the second: the shipped network on a real CT scout); the cut
    /// is [`UNSURE_BELOW`].
    #[test]
    fn a_frame_is_unsure_when_its_best_half_is_faint() {
        let well_read = [0.99, 0.98, 0.99, 0.97, 0.99, 0.95, 0.02, 0.01];
        assert!(!unsure(well_read.into_iter()));
        let unlike = [0.84, 0.06, 0.63, 0.65, 0.03, 0.06, 0.72, 0.12];
        assert!(unsure(unlike.into_iter()));
        let at = |v: f64| unsure([v; 8].into_iter());
        assert!(at(UNSURE_BELOW - 1e-9) && !at(UNSURE_BELOW));
    }
}
