//! Pose-consistent landmark decoding, beyond the paper: the CT's 3D landmarks say where the 8
//! landmarks can be relative to each other, so a heatmap's strongest peak that no pose agrees
//! with (the other ASIS, a foramen's far rim, a peak in the collimator's shadow) is replaced.
//!
//! 1. The strongest peak of each heatmap goes to the production solver ([`super::solve`], MSAC
//!    over P3P triplets), which finds the pose most landmarks agree with.
//! 2. A landmark whose peak lies farther than the gate from its reprojection takes the weaker
//!    peak of its heatmap that the pose predicts (when one lies within the gate), and the pose is
//!    refined on the agreeing landmarks.
//! 3. A landmark that still disagrees is, when enough others agree, put where the pose projects
//!    it and marked [`Origin::Reprojected`]: a prediction of the registration, not of the network,
//!    and never a weight in the pose.
//! 4. With [`ConsensusOptions::snap`], the agreeing landmarks go to their reprojection too: the
//!    pose fits 6 parameters to up to 16 coordinates, so its projections carry less of the
//!    network's independent jitter than the peaks do (on 80 held-out subjects the median
//!    landmark error falls by a quarter). The pose itself does not change.
//!
//! The network is unchanged; only the decoding from heatmaps to points uses the CT.

use super::{LmOptions, Problem, Solution, solve, solve_from};
use crate::geometry::Camera;
use crate::geometry::Pose;
use nalgebra::{Point2, Point3};
use serde::Serialize;

/// Where a decoded landmark comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A peak of its heatmap (0 = the strongest, i.e. the plain argmax).
    Peak(u8),
    /// The reprojection of the CT's landmark at the solved pose: the heatmap had no peak there.
    Reprojected,
}

/// Settings of the decoding.
#[derive(Clone, Copy, Debug)]
pub struct ConsensusOptions {
    /// A peak agrees with the pose when it lies within this many pixels of its reprojection,
    /// as a fraction of the image width (0.03 = 7.7 px at 256, 15 px at 512).
    pub gate_fraction: f64,
    /// Weaker peaks are considered only above this probability.
    pub min_confidence: f64,
    /// A landmark is reprojected only when at least this many others agree with the pose.
    pub min_agreeing: usize,
    /// Put the agreeing landmarks at their reprojection as well (step 4): the landmarks as the
    /// registered CT places them rather than as the heatmaps peak.
    pub snap: bool,
}

impl Default for ConsensusOptions {
    fn default() -> Self {
        Self {
            gate_fraction: 0.03,
            min_confidence: 0.05,
            min_agreeing: 6,
            snap: false,
        }
    }
}

/// The decoded landmarks and the pose they give.
#[derive(Clone, Debug)]
pub struct Consensus {
    /// Per landmark: the point and its confidence (a reprojected one keeps its heatmap's
    /// strongest probability, for display; it does not weigh in the pose).
    pub detections: Vec<(Point2<f64>, f64)>,
    /// Per landmark: which peak was taken, or that it was reprojected.
    pub origin: Vec<Origin>,
    /// The pose from the agreeing landmarks (the plain solve when the decoding changed nothing).
    pub solution: Solution,
}

/// Decodes landmarks from each heatmap's `candidates` (strongest first, as
/// `model::heatmap::candidates` gives them) so that they agree with one pose of the CT's
/// landmarks `points3d` (absent ones stay the strongest peak). `init` is the previous frame's
/// pose, if any.
pub fn decode(
    camera: &Camera,
    points3d: &[Option<Point3<f64>>],
    candidates: &[Vec<(Point2<f64>, f64)>],
    init: Option<&Pose>,
    opts: &ConsensusOptions,
) -> Consensus {
    let n = candidates.len();
    let strongest: Vec<(Point2<f64>, f64)> = candidates
        .iter()
        .map(|c| {
            c.first()
                .copied()
                .unwrap_or((Point2::new(f64::NAN, f64::NAN), 0.0))
        })
        .collect();
    let first = super::solve_detections(camera, points3d, &strongest, init);
    let mut out = Consensus {
        detections: strongest.clone(),
        origin: vec![Origin::Peak(0); n],
        solution: first,
    };
    if !out.solution.status.ok() || points3d.len() != n {
        return out;
    }
    let gate = opts.gate_fraction * f64::from(camera.width_px);
    let project = |pose: &Pose, i: usize| camera.project_in_front(pose, &points3d[i]?);
    // Step 2: per landmark, the strongest peak within the gate of the reprojection.
    let pose0 = out.solution.pose;
    let mut agrees = vec![false; n];
    for i in 0..n {
        let Some(q) = project(&pose0, i) else {
            continue;
        };
        let pick = candidates[i].iter().enumerate().find(|(rank, (p, c))| {
            (*rank == 0 || *c >= opts.min_confidence) && (p - q).norm() <= gate
        });
        if let Some((rank, &d)) = pick {
            out.detections[i] = d;
            out.origin[i] = Origin::Peak(rank.min(u8::MAX as usize) as u8);
            agrees[i] = true;
        }
    }
    let n_agree = agrees.iter().filter(|a| **a).count();
    if n_agree < opts.min_agreeing.max(4) {
        // Too few agree for the pose to vouch for anything: the plain argmax stands.
        out.detections = strongest;
        out.origin = vec![Origin::Peak(0); n];
        return out;
    }
    // Refine on the agreeing landmarks alone (the others carry no weight), from pose0; fall
    // back to the robust start if that goes astray.
    let pts: Vec<Point3<f64>> = points3d.iter().map(|p| p.unwrap_or_default()).collect();
    let p2: Vec<Option<Point2<f64>>> = (0..n)
        .map(|i| agrees[i].then_some(out.detections[i].0))
        .collect();
    let w: Vec<f64> = (0..n).map(|i| out.detections[i].1.max(1e-3)).collect();
    let pb = Problem {
        camera,
        points3d: &pts,
        points2d: &p2,
        weights: Some(&w),
    };
    let lm = LmOptions::default();
    let mut sol = solve_from(&pb, &pose0, &lm);
    if !sol.status.ok() || sol.rmse_px > gate {
        sol = solve(&pb, &lm);
    }
    if !sol.status.ok() {
        return out;
    }
    // Step 3: the landmarks no peak supports go where the pose puts them; step 4: with `snap`,
    // the agreeing ones too (they keep their peak's origin and confidence).
    for i in 0..n {
        let Some(q) = project(&sol.pose, i) else {
            continue;
        };
        if !agrees[i] {
            out.detections[i] = (q, strongest[i].1);
            out.origin[i] = Origin::Reprojected;
        } else if opts.snap {
            out.detections[i].0 = q;
        }
    }
    out.solution = sol;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::landmarks::N_LANDMARKS;
    use nalgebra::Vector3;

    type Scene = (Camera, Vec<Option<Point3<f64>>>, Pose, Vec<Point2<f64>>);

    fn scene() -> Scene {
        let camera = Camera::paper(256);
        let (_, lm) = crate::volume::phantom::phantom_subject(3, None);
        let p3: Vec<Option<Point3<f64>>> = lm.points.to_vec();
        let pose = Pose::new(
            Vector3::new(0.3, -0.2, 0.1),
            Vector3::new(5.0, -10.0, 820.0),
        );
        let truth: Vec<Point2<f64>> = p3
            .iter()
            .map(|p| camera.project(&pose, &p.expect("phantom landmarks are all set")))
            .collect();
        (camera, p3, pose, truth)
    }

    #[test]
    fn a_wrong_strongest_peak_gives_way_to_the_weaker_peak_the_pose_predicts() {
        let (camera, p3, pose, truth) = scene();
        assert_eq!(truth.len(), N_LANDMARKS);
        // Every heatmap peaks at the truth (+0.3 px), except landmark 0, whose strongest peak
        // is 60 px away and whose second peak is the right one.
        let mut cands: Vec<Vec<(Point2<f64>, f64)>> = truth
            .iter()
            .map(|t| vec![(t + Vector3::new(0.3, -0.2, 0.0).xy(), 0.9)])
            .collect();
        let wrong = truth[0] + Vector3::new(60.0, 10.0, 0.0).xy();
        cands[0] = vec![(wrong, 0.8), (truth[0], 0.4)];
        // Landmark 5 has no peak near the truth at all.
        cands[5] = vec![(truth[5] + Vector3::new(-45.0, 30.0, 0.0).xy(), 0.7)];
        let c = decode(&camera, &p3, &cands, None, &ConsensusOptions::default());
        assert!(c.solution.status.ok());
        assert_eq!(c.origin[0], Origin::Peak(1));
        assert_eq!(c.detections[0].0, truth[0]);
        assert_eq!(c.origin[5], Origin::Reprojected);
        assert!(
            (c.detections[5].0 - truth[5]).norm() < 1.0,
            "{:?}",
            c.detections[5]
        );
        assert!(c.origin[1..5].iter().all(|o| *o == Origin::Peak(0)));
        let tre = super::super::metrics::mean_tre_mm(
            &c.solution.pose,
            &pose,
            &p3.iter().flatten().copied().collect::<Vec<_>>(),
        );
        assert!(tre < 2.0, "TRE {tre} mm");
    }

    #[test]
    fn too_few_agreeing_landmarks_leave_the_argmax_alone() {
        let (camera, p3, _, truth) = scene();
        // Four landmarks scattered far from where any pose puts them with the other four.
        let cands: Vec<Vec<(Point2<f64>, f64)>> = truth
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let off = if i % 2 == 0 {
                    Vector3::new(37.0 * (i as f64 - 3.0), 41.0, 0.0).xy()
                } else {
                    Vector3::zeros().xy()
                };
                vec![(t + off, 0.9)]
            })
            .collect();
        let c = decode(&camera, &p3, &cands, None, &ConsensusOptions::default());
        assert!(
            c.origin.iter().all(|o| *o == Origin::Peak(0)),
            "{:?}",
            c.origin
        );
        for (d, cand) in c.detections.iter().zip(&cands) {
            assert_eq!(d.0, cand[0].0);
        }
    }

    #[test]
    fn snapping_puts_agreeing_landmarks_at_the_pose_and_removes_most_of_their_jitter() {
        let (camera, p3, _, truth) = scene();
        // Every peak 1-2 px off the truth in a different direction (a detector's jitter).
        let jitter = [
            (1.5, -0.8),
            (-1.2, 1.4),
            (0.9, 1.6),
            (-1.7, -0.6),
            (1.1, 1.3),
            (-0.4, -1.9),
            (1.8, 0.2),
            (-1.0, -1.2),
        ];
        let cands: Vec<Vec<(Point2<f64>, f64)>> = truth
            .iter()
            .zip(jitter)
            .map(|(t, (dx, dy))| vec![(Point2::new(t.x + dx, t.y + dy), 0.9)])
            .collect();
        let plain = decode(&camera, &p3, &cands, None, &ConsensusOptions::default());
        let snap = ConsensusOptions {
            snap: true,
            ..ConsensusOptions::default()
        };
        let snapped = decode(&camera, &p3, &cands, None, &snap);
        assert!(snapped.solution.status.ok());
        // The pose is the same; only where the points are drawn changes.
        assert_eq!(snapped.solution.pose, plain.solution.pose);
        assert!(snapped.origin.iter().all(|o| *o == Origin::Peak(0)));
        let rms = |c: &Consensus| {
            let sq: f64 = c
                .detections
                .iter()
                .zip(&truth)
                .map(|(d, t)| (d.0 - t).norm_squared())
                .sum();
            (sq / truth.len() as f64).sqrt()
        };
        for (i, d) in snapped.detections.iter().enumerate() {
            let p = p3[i].expect("phantom landmarks are all set");
            let q = camera.project(&snapped.solution.pose, &p);
            assert!((d.0 - q).norm() < 1e-9, "landmark {i} is not at the pose");
            assert_eq!(d.1, cands[i][0].1, "landmark {i} lost its confidence");
        }
        // Unsnapped, the points are the peaks.
        let jitter_rms = (jitter.iter().map(|(x, y)| x * x + y * y).sum::<f64>() / 8.0).sqrt();
        assert!((rms(&plain) - jitter_rms).abs() < 1e-9);
        assert!(
            rms(&snapped) < 0.8 * rms(&plain),
            "snapped {} px, peaks {} px",
            rms(&snapped),
            rms(&plain)
        );
    }
}
