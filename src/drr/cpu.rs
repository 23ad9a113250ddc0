//! The CPU reference renderer (rayon): exact Siddon-Jacobs ray traversal, and DiffDRR-style
//! trilinear ray marching. The GPU shaders mirror these functions line by line.

use super::DensityVolume;
use crate::geometry::{Camera, Pose};
use nalgebra::{Point2, Point3};
use rayon::prelude::*;

/// Which ray integral to compute.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Renderer {
    /// Exact radiological path: every voxel a ray crosses, weighted by its intersection length.
    Siddon {
        /// Integrate the whole line through the volume, also beyond the detector (DiffDRR's
        /// Siddon does: it never clips its plane intersections to the source-detector segment),
        /// rather than only from the source to the detector.
        full_line: bool,
    },
    /// `n_points` trilinear samples evenly spaced over one parameter range shared by all rays,
    /// as DiffDRR's `Trilinear(n_points=500)` does.
    Trilinear {
        /// Samples per ray.
        n_points: u32,
    },
    /// Trilinear samples at a fixed spacing along each ray's own stretch inside the volume
    /// (segment midpoints, the last segment shortened): the renderer of choice for display.
    TrilinearStep {
        /// Distance between samples, mm.
        step_mm: f64,
        /// Integrate beyond the detector too (see [`Renderer::Siddon`]).
        full_line: bool,
    },
}

/// Source and pixel-centre target of every ray, in continuous voxel coordinates, with the
/// world length of each ray (mm).
pub(crate) fn rays(
    vol: &DensityVolume,
    camera: &Camera,
    pose: &Pose,
) -> (Point3<f64>, Vec<(Point3<f64>, f64)>) {
    let m = vol.voxel_from_world;
    let src_w = pose.source_world();
    let src = m.transform_point(&src_w);
    let (w, h) = (camera.width_px as usize, camera.height_px as usize);
    let targets = (0..w * h)
        .map(|n| {
            let (r, c) = (n / w, n % w);
            let uv = Point2::new(c as f64 + 0.5, r as f64 + 0.5);
            let tw = pose.world_from_camera(&camera.detector_point(&uv));
            (m.transform_point(&tw), (tw - src_w).norm())
        })
        .collect();
    (src, targets)
}

/// Siddon-Jacobs: `Σ density * Δα` along `s -> t` (voxel coordinates, α in [0, 1], voxel
/// `i` spans `[i - 0.5, i + 0.5]`); multiply by the ray length for mm.
pub fn siddon_ray(vol: &DensityVolume, s: &Point3<f64>, t: &Point3<f64>) -> f64 {
    siddon_ray_within(vol, s, t, 0.0, 1.0)
}

/// [`siddon_ray`] over the parameter range `[a_lo, a_hi]` (infinite bounds: the whole line).
pub fn siddon_ray_within(
    vol: &DensityVolume,
    s: &Point3<f64>,
    t: &Point3<f64>,
    a_lo: f64,
    a_hi: f64,
) -> f64 {
    let d = t - s;
    // Only the box of non-zero voxels: outside it every voxel adds zero.
    let Some([occ_lo, occ_hi]) = vol.occupied else {
        return 0.0;
    };
    let (mut amin, mut amax) = (a_lo, a_hi);
    for a in 0..3 {
        let (lo, hi) = (occ_lo[a] as f64 - 0.5, occ_hi[a] as f64 + 0.5);
        if d[a].abs() < 1e-12 {
            if s[a] < lo || s[a] > hi {
                return 0.0;
            }
            continue;
        }
        let a0 = (lo - s[a]) / d[a];
        let a1 = (hi - s[a]) / d[a];
        amin = amin.max(a0.min(a1));
        amax = amax.min(a0.max(a1));
    }
    if amin >= amax {
        return 0.0;
    }
    // First voxel: the one containing the point just after entry.
    let a_in = amin + 1e-9 * (amax - amin);
    let mut idx = [0i64; 3];
    let mut step = [0i64; 3];
    let mut next = [f64::INFINITY; 3];
    let mut delta = [f64::INFINITY; 3];
    for a in 0..3 {
        let p = s[a] + d[a] * a_in;
        idx[a] = ((p + 0.5).floor() as i64).clamp(occ_lo[a] as i64, occ_hi[a] as i64);
        if d[a].abs() >= 1e-12 {
            step[a] = if d[a] > 0.0 { 1 } else { -1 };
            let plane = idx[a] as f64 + 0.5 * step[a] as f64;
            next[a] = (plane - s[a]) / d[a];
            delta[a] = 1.0 / d[a].abs();
        }
    }
    let mut acc = 0.0f64;
    let mut cur = amin;
    loop {
        let axis = if next[0] <= next[1] && next[0] <= next[2] {
            0
        } else if next[1] <= next[2] {
            1
        } else {
            2
        };
        let end = next[axis].min(amax);
        if end > cur {
            acc += vol.at(idx[0] as usize, idx[1] as usize, idx[2] as usize) as f64 * (end - cur);
            cur = end;
        }
        if next[axis] >= amax {
            break;
        }
        idx[axis] += step[axis];
        if idx[axis] < occ_lo[axis] as i64 || idx[axis] > occ_hi[axis] as i64 {
            break;
        }
        next[axis] += delta[axis];
    }
    acc
}

/// The parameter range of `s -> t` inside the grid box `[-0.5, n - 0.5]`, within `[lo, hi]`.
fn clip_to_grid(
    vol: &DensityVolume,
    s: &Point3<f64>,
    t: &Point3<f64>,
    lo: f64,
    hi: f64,
) -> (f64, f64) {
    let d = t - s;
    let (mut amin, mut amax) = (lo, hi);
    for a in 0..3 {
        let top = vol.dims[a] as f64 - 0.5;
        if d[a].abs() < 1e-12 {
            if s[a] < -0.5 || s[a] > top {
                return (1.0, 0.0);
            }
            continue;
        }
        let (a0, a1) = ((-0.5 - s[a]) / d[a], (top - s[a]) / d[a]);
        amin = amin.max(a0.min(a1));
        amax = amax.min(a0.max(a1));
    }
    (amin, amax)
}

/// `Σ trilinear × Δα` at midpoints of `step_mm` segments over the ray's stretch in the grid.
fn trilinear_step_ray(
    vol: &DensityVolume,
    s: &Point3<f64>,
    t: &Point3<f64>,
    len_mm: f64,
    step_mm: f64,
    lo: f64,
    hi: f64,
) -> f64 {
    let (amin, amax) = clip_to_grid(vol, s, t, lo, hi);
    if amin >= amax || len_mm <= 0.0 || step_mm <= 0.0 {
        return 0.0;
    }
    let d = t - s;
    let da = step_mm / len_mm;
    let steps = ((amax - amin) / da).ceil() as usize;
    (0..steps)
        .map(|k| {
            let a0 = amin + da * k as f64;
            let a1 = (a0 + da).min(amax);
            trilinear(vol, &(s + d * (0.5 * (a0 + a1)))) * (a1 - a0)
        })
        .sum()
}

/// Trilinear sample with zeros outside the grid (torch `grid_sample`, `align_corners=False`,
/// zero padding, in voxel-centre coordinates).
pub fn trilinear(vol: &DensityVolume, p: &Point3<f64>) -> f64 {
    let n = vol.dims;
    let f = [p.x.floor(), p.y.floor(), p.z.floor()];
    let base = [f[0] as i64, f[1] as i64, f[2] as i64];
    let w = [p.x - f[0], p.y - f[1], p.z - f[2]];
    let mut acc = 0.0;
    for corner in 0..8 {
        let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
        let ijk = [
            base[0] + o[0] as i64,
            base[1] + o[1] as i64,
            base[2] + o[2] as i64,
        ];
        if (0..3).any(|a| ijk[a] < 0 || ijk[a] >= n[a] as i64) {
            continue;
        }
        let wt: f64 = (0..3)
            .map(|a| if o[a] == 1 { w[a] } else { 1.0 - w[a] })
            .product();
        acc += wt * vol.at(ijk[0] as usize, ijk[1] as usize, ijk[2] as usize) as f64;
    }
    acc
}

/// DiffDRR's `_get_alpha_minmax` for one ray, kept with its upper plane at `dims + 0.5`
/// (one voxel beyond the grid; harmless because samples there are zero) for parity.
pub(crate) fn diffdrr_alpha_range(
    vol: &DensityVolume,
    s: &Point3<f64>,
    t: &Point3<f64>,
) -> (f64, f64) {
    let eps = 1e-8;
    let mut lo = f64::NEG_INFINITY;
    let mut hi = f64::INFINITY;
    for a in 0..3 {
        let d = t[a] - s[a] + eps;
        let a0 = (-0.5 - s[a]) / d;
        let a1 = (vol.dims[a] as f64 + 0.5 - s[a]) / d;
        lo = lo.max(a0.min(a1));
        hi = hi.min(a0.max(a1));
    }
    (lo.max(0.0), hi.min(1.0))
}

/// DiffDRR's sample range for a whole image: the extremes of its rays' own ranges.
pub(crate) fn diffdrr_image_alpha_range(
    vol: &DensityVolume,
    src: &Point3<f64>,
    targets: &[(Point3<f64>, f64)],
) -> (f64, f64) {
    targets
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (t, _)| {
            let (a, b) = diffdrr_alpha_range(vol, src, t);
            (lo.min(a), hi.max(b))
        })
}

/// The ray parameter range integrated: source to detector, or the whole line.
fn line_range(full_line: bool) -> (f64, f64) {
    if full_line {
        (f64::NEG_INFINITY, f64::INFINITY)
    } else {
        (0.0, 1.0)
    }
}

/// Renders a DRR on the CPU: `height x width` values, row 0 at the top, in mm x attenuation.
pub fn render(vol: &DensityVolume, camera: &Camera, pose: &Pose, renderer: Renderer) -> Vec<f32> {
    let (src, targets) = rays(vol, camera, pose);
    match renderer {
        Renderer::Siddon { full_line } => {
            let (lo, hi) = line_range(full_line);
            targets
                .par_iter()
                .map(|(t, len)| (siddon_ray_within(vol, &src, t, lo, hi) * len) as f32)
                .collect()
        }
        Renderer::Trilinear { n_points } => {
            let n_points = n_points.max(2);
            let (lo, hi) = diffdrr_image_alpha_range(vol, &src, &targets);
            let step = (hi - lo) / (n_points - 1) as f64;
            targets
                .par_iter()
                .map(|(t, len)| {
                    let d = t - src;
                    let sum: f64 = (0..n_points)
                        .map(|k| trilinear(vol, &(src + d * (lo + step * k as f64))))
                        .sum();
                    (sum * step * len) as f32
                })
                .collect()
        }
        Renderer::TrilinearStep { step_mm, full_line } => {
            let (lo0, hi0) = line_range(full_line);
            targets
                .par_iter()
                .map(|(t, len)| {
                    (trilinear_step_ray(vol, &src, t, *len, step_mm, lo0, hi0) * len) as f32
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drr::Attenuation;
    use crate::volume::Volume;
    use nalgebra::{Matrix3, Vector3};

    fn cube(n: usize, value: f32) -> DensityVolume {
        let v = Volume::new(
            [n; 3],
            [1.0; 3],
            Vector3::repeat(-(n as f64 - 1.0) / 2.0),
            Matrix3::identity(),
            vec![value; n * n * n],
        )
        .unwrap();
        DensityVolume::from_volume(
            &v,
            Attenuation::Physical {
                mu_water_per_mm: 1.0,
            },
        )
    }

    #[test]
    fn siddon_path_length_through_a_uniform_cube() {
        // mu = 1/mm everywhere, so the integral is the chord length.
        let vol = cube(10, 0.0); // HU 0 -> mu = 1
        // Axis-aligned ray through the middle: 10 mm.
        let s = Point3::new(-20.0, 4.3, 4.6);
        let t = Point3::new(30.0, 4.3, 4.6);
        let len = (t - s).norm();
        assert!((siddon_ray(&vol, &s, &t) * len - 10.0).abs() < 1e-9);
        // Diagonal through opposite corners: 10 sqrt(3).
        let s = Point3::new(-5.5, -5.5, -5.5);
        let t = Point3::new(14.5, 14.5, 14.5);
        let len = (t - s).norm();
        assert!((siddon_ray(&vol, &s, &t) * len - 10.0 * 3f64.sqrt()).abs() < 1e-6);
        // A miss.
        assert_eq!(
            siddon_ray(
                &vol,
                &Point3::new(-5.0, 20.0, 0.0),
                &Point3::new(15.0, 20.0, 0.0)
            ),
            0.0
        );
    }

    #[test]
    fn siddon_weights_each_voxel_by_its_chord() {
        // One hot voxel (mu = 3/mm) in air: the ray through it integrates exactly its chord,
        // a ray beside it nothing (the occupied box is that one voxel).
        let mut hu = vec![-1000.0f32; 125];
        hu[2 + 5 * (2 + 5 * 2)] = 2000.0;
        let v = Volume::new([5; 3], [1.0; 3], Vector3::zeros(), Matrix3::identity(), hu).unwrap();
        let vol = DensityVolume::from_volume(
            &v,
            Attenuation::Physical {
                mu_water_per_mm: 1.0,
            },
        );
        assert_eq!(vol.occupied, Some([[2, 2, 2], [2, 2, 2]]));
        let s = Point3::new(2.0, 2.0, -10.0);
        let t = Point3::new(2.0, 2.0, 10.0);
        assert!((siddon_ray(&vol, &s, &t) * 20.0 - 3.0).abs() < 1e-9);
        // Diagonal through the hot voxel's centre: chord sqrt(3).
        let s = Point3::new(-3.0, -3.0, -3.0);
        let t = Point3::new(7.0, 7.0, 7.0);
        assert!((siddon_ray(&vol, &s, &t) * (t - s).norm() - 3.0 * 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(
            siddon_ray(
                &vol,
                &Point3::new(1.0, 2.0, -10.0),
                &Point3::new(1.0, 2.0, 10.0)
            ),
            0.0
        );
    }

    #[test]
    fn trilinear_matches_siddon_on_smooth_data() {
        let n = 24;
        let hu: Vec<f32> = (0..n * n * n)
            .map(|q| {
                let (i, j, k) = (q % n, (q / n) % n, q / (n * n));
                let r2 = ((i as f32 - 11.5).powi(2)
                    + (j as f32 - 11.5).powi(2)
                    + (k as f32 - 11.5).powi(2))
                    / 60.0;
                1000.0 * (-r2).exp() - 1000.0
            })
            .collect();
        let v = Volume::new(
            [n; 3],
            [2.0; 3],
            Vector3::repeat(-23.0),
            Matrix3::identity(),
            hu,
        )
        .unwrap();
        let vol = DensityVolume::from_volume(
            &v,
            Attenuation::Physical {
                mu_water_per_mm: 1.0,
            },
        );
        let cam = Camera::new(400.0, 16, 16, 4.0, 4.0);
        let pose = Pose::new(Vector3::new(0.2, 0.1, 0.0), Vector3::new(0.0, 0.0, 200.0));
        let a = render(&vol, &cam, &pose, Renderer::Siddon { full_line: false });
        let b = render(&vol, &cam, &pose, Renderer::Trilinear { n_points: 2000 });
        let peak = a.iter().copied().fold(0.0f32, f32::max);
        assert!(peak > 1.0);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.03 * peak, "{x} vs {y}");
        }
    }
}
