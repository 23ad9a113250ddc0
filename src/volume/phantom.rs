//! A parametric pelvis phantom: anatomically shaped bones built from signed-distance primitives,
//! rasterised to Hounsfield units, with the paper's 8 landmarks computed from the same geometry.
//!
//! It makes the project usable with no data (the app's default CT, tests, training data), and a
//! seeded generator varies size, proportions, sex-typical shape, pelvic tilt, bone density and
//! soft tissue, so that a held-out "novel subject" is a different pelvis, not the same one again.
//!
//! Frame: LPS millimetres, origin at the midpoint between the two hip-joint centres (before the
//! subject's tilt). Left-side parts are built at +x and mirrored for the right side.
//!
//! What is modelled, per side: femoral head in an acetabular cup (with a joint space), femoral
//! neck, greater trochanter and proximal shaft (hollow: cortex around a marrow canal); ilium as a
//! curved fan-shaped plate with a thick iliac crest ending at the ASIS and a thick body above the
//! acetabulum; the obturator ring (superior pubic ramus, ischium, inferior ramus) around the
//! obturator foramen; ischial tuberosity; pubic body meeting its twin at the symphysis. Midline:
//! sacrum (tapered, curved, with foramina), L3-L5 vertebrae with discs and posterior elements.
//! Soft tissue: a muscle body inside a fat layer, a fluid-filled bladder and bowel gas, in air.

use super::{Volume, VolumeMeta};
use crate::landmarks::{Landmarks3d, N_LANDMARKS};
use nalgebra::{Matrix3, Point3, Rotation3, Vector3};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

type P3 = Point3<f64>;
type V3 = Vector3<f64>;

/// HU of the tissues.
const AIR_HU: f32 = -1000.0;
const FAT_HU: f32 = -95.0;
const MUSCLE_HU: f32 = 45.0;
const FLUID_HU: f32 = 10.0;
const GAS_HU: f32 = -850.0;
const DISC_HU: f32 = 90.0;

/// The knobs of one subject. [`PhantomParams::subject`] draws them from a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct PhantomParams {
    /// Subject id (also the seed of the small asymmetries).
    pub subject: u64,
    /// Overall scale (1 = a mid-sized adult).
    pub scale: f64,
    /// Extra left-right scale of the pelvis.
    pub width: f64,
    /// Female-typical shape (wider, shorter symphysis, rounder foramina) when true.
    pub female: bool,
    /// Pelvic tilt about the left-right axis, radians (positive: anterior tilt).
    pub tilt_rad: f64,
    /// Obliquity about the antero-posterior axis, radians.
    pub obliquity_rad: f64,
    /// Axial rotation about the superior axis, radians.
    pub rotation_rad: f64,
    /// Multiplies bone HU (osteoporotic < 1 < dense).
    pub bone_density: f64,
    /// Subcutaneous fat thickness, mm.
    pub fat_mm: f64,
    /// Muscle envelope size factor.
    pub body_size: f64,
    /// Voxel size of the rasterised volume, mm (isotropic).
    pub spacing_mm: f64,
}

impl Default for PhantomParams {
    fn default() -> Self {
        Self {
            subject: 0,
            scale: 1.0,
            width: 1.0,
            female: false,
            tilt_rad: 0.0,
            obliquity_rad: 0.0,
            rotation_rad: 0.0,
            bone_density: 1.0,
            fat_mm: 20.0,
            body_size: 1.0,
            spacing_mm: 2.0,
        }
    }
}

impl PhantomParams {
    /// A reproducible random subject. Subject 0 is the average pelvis ([`Default`]).
    pub fn subject(id: u64) -> Self {
        if id == 0 {
            return Self::default();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_0000 + id);
        let female = rng.random_bool(0.5);
        Self {
            subject: id,
            scale: rng.random_range(0.88..1.12),
            width: rng.random_range(0.93..1.07) * if female { 1.05 } else { 1.0 },
            female,
            tilt_rad: rng.random_range(-12.0f64..12.0).to_radians(),
            obliquity_rad: rng.random_range(-3.0f64..3.0).to_radians(),
            rotation_rad: rng.random_range(-4.0f64..4.0).to_radians(),
            bone_density: rng.random_range(0.75..1.25),
            fat_mm: rng.random_range(8.0..45.0),
            body_size: rng.random_range(0.9..1.12),
            spacing_mm: 2.0,
        }
    }
}

/// A signed-distance primitive (negative inside), in mm.
#[derive(Clone, Debug)]
enum Shape {
    /// Capsule with radius varying linearly from `ra` at `a` to `rb` at `b`.
    Capsule { a: P3, b: P3, ra: f64, rb: f64 },
    /// Ellipsoid with axes `rot` columns and radii.
    Ellipsoid { c: P3, rot: Matrix3<f64>, r: V3 },
    /// A triangle thickened by `half` mm.
    Slab { t: [P3; 3], half: f64 },
    /// `outer` with the ball (`c`, `r`) cut out (the acetabular cup).
    Cup { outer: Box<Shape>, c: P3, r: f64 },
    /// `outer` minus `inner` (hollow bone).
    Hollow {
        outer: Box<Shape>,
        inner: Box<Shape>,
    },
}

impl Shape {
    fn sdf(&self, p: &P3) -> f64 {
        match self {
            Shape::Capsule { a, b, ra, rb } => {
                let ab = b - a;
                let t = ((p - a).dot(&ab) / ab.norm_squared().max(1e-12)).clamp(0.0, 1.0);
                (p - (a + ab * t)).norm() - (ra + (rb - ra) * t)
            }
            Shape::Ellipsoid { c, rot, r } => {
                let q = rot.transpose() * (p - c);
                let k0 = q.component_div(r).norm();
                let k1 = q.component_div(&r.component_mul(r)).norm();
                if k1 < 1e-12 {
                    -r.min()
                } else {
                    k0 * (k0 - 1.0) / k1
                }
            }
            Shape::Slab { t, half } => dist_triangle(p, t) - half,
            Shape::Cup { outer, c, r } => outer.sdf(p).max(r - (p - c).norm()),
            Shape::Hollow { outer, inner } => outer.sdf(p).max(-inner.sdf(p)),
        }
    }

    /// Axis-aligned bounds (conservative).
    fn bounds(&self) -> (P3, P3) {
        match self {
            Shape::Capsule { a, b, ra, rb } => {
                let r = ra.max(*rb);
                (a.inf(b) - V3::repeat(r), a.sup(b) + V3::repeat(r))
            }
            Shape::Ellipsoid { c, r, .. } => (c - V3::repeat(r.max()), c + V3::repeat(r.max())),
            Shape::Slab { t, half } => (
                t[0].inf(&t[1]).inf(&t[2]) - V3::repeat(*half),
                t[0].sup(&t[1]).sup(&t[2]) + V3::repeat(*half),
            ),
            Shape::Cup { outer, .. } | Shape::Hollow { outer, .. } => outer.bounds(),
        }
    }

    fn transformed(&self, f: &impl Fn(&P3) -> P3, lin: &Matrix3<f64>) -> Shape {
        match self {
            Shape::Capsule { a, b, ra, rb } => Shape::Capsule {
                a: f(a),
                b: f(b),
                ra: *ra,
                rb: *rb,
            },
            Shape::Ellipsoid { c, rot, r } => Shape::Ellipsoid {
                c: f(c),
                rot: lin * rot,
                r: *r,
            },
            Shape::Slab { t, half } => Shape::Slab {
                t: [f(&t[0]), f(&t[1]), f(&t[2])],
                half: *half,
            },
            Shape::Cup { outer, c, r } => Shape::Cup {
                outer: Box::new(outer.transformed(f, lin)),
                c: f(c),
                r: *r,
            },
            Shape::Hollow { outer, inner } => Shape::Hollow {
                outer: Box::new(outer.transformed(f, lin)),
                inner: Box::new(inner.transformed(f, lin)),
            },
        }
    }
}

/// Unsigned distance from `p` to triangle `t` (Ericson, Real-Time Collision Detection 5.1.5).
fn dist_triangle(p: &P3, t: &[P3; 3]) -> f64 {
    let (a, b, c) = (t[0], t[1], t[2]);
    let (ab, ac, ap) = (b - a, c - a, p - a);
    let (d1, d2) = (ab.dot(&ap), ac.dot(&ap));
    if d1 <= 0.0 && d2 <= 0.0 {
        return ap.norm();
    }
    let bp = p - b;
    let (d3, d4) = (ab.dot(&bp), ac.dot(&bp));
    if d3 >= 0.0 && d4 <= d3 {
        return bp.norm();
    }
    let vc = d1 * d4 - d3 * d2;
    if vc <= 0.0 && d1 >= 0.0 && d3 <= 0.0 {
        let v = d1 / (d1 - d3);
        return (p - (a + ab * v)).norm();
    }
    let cp = p - c;
    let (d5, d6) = (ab.dot(&cp), ac.dot(&cp));
    if d6 >= 0.0 && d5 <= d6 {
        return cp.norm();
    }
    let vb = d5 * d2 - d1 * d6;
    if vb <= 0.0 && d2 >= 0.0 && d6 <= 0.0 {
        let w = d2 / (d2 - d6);
        return (p - (a + ac * w)).norm();
    }
    let va = d3 * d6 - d5 * d4;
    if va <= 0.0 && (d4 - d3) >= 0.0 && (d5 - d6) >= 0.0 {
        let w = (d4 - d3) / ((d4 - d3) + (d5 - d6));
        return (p - (b + (c - b) * w)).norm();
    }
    let denom = 1.0 / (va + vb + vc);
    let (v, w) = (vb * denom, vc * denom);
    (p - (a + ab * v + ac * w)).norm()
}

/// A bone: shapes whose union is one material, with cortical thickness and HU.
#[derive(Clone, Debug)]
struct Bone {
    shapes: Vec<Shape>,
    cortex_mm: f64,
    cortical_hu: f32,
    cancellous_hu: f32,
}

/// The built pelvis: bones, soft tissue, landmarks.
#[derive(Clone, Debug)]
pub struct Phantom {
    /// The parameters it was built from.
    pub params: PhantomParams,
    bones: Vec<Bone>,
    /// Symphysis / disc cartilage: soft, between bones.
    cartilage: Vec<Shape>,
    bladder: Shape,
    gas: Vec<Shape>,
    /// Muscle envelope: elliptic cylinder (centre x, y; semi-axes a, b).
    body: (f64, f64, f64, f64),
    /// The 8 landmarks, LPS mm.
    pub landmarks: Landmarks3d,
    /// Region to rasterise, LPS mm.
    pub bounds: (P3, P3),
}

fn caps_chain(pts: &[P3], radii: &[f64]) -> Vec<Shape> {
    pts.windows(2)
        .zip(radii.windows(2))
        .map(|(p, r)| Shape::Capsule {
            a: p[0],
            b: p[1],
            ra: r[0],
            rb: r[1],
        })
        .collect()
}

fn ell(c: P3, r: V3) -> Shape {
    Shape::Ellipsoid {
        c,
        rot: Matrix3::identity(),
        r,
    }
}

impl Phantom {
    /// Builds the geometry of one subject.
    pub fn new(params: &PhantomParams) -> Self {
        let s = params.scale;
        let w = params.width;
        let fem = params.female;
        let mut rng = ChaCha8Rng::seed_from_u64(0xA5_0000 + params.subject);
        // Small independent asymmetries (mm), so left and right are not exact mirrors.
        let mut jit = |amp: f64| {
            V3::new(
                rng.random_range(-amp..amp),
                rng.random_range(-amp..amp),
                rng.random_range(-amp..amp),
            )
        };
        // Base anatomy in mm, left side (+x), before scaling: s scales everything, w widens x.
        let sc = |x: f64, y: f64, z: f64| P3::new(x * s * w, y * s, z * s);

        let mut cortical_bone: Vec<Shape> = Vec::new();
        let mut femur: Vec<Shape> = Vec::new();
        let mut lm = [P3::origin(); N_LANDMARKS];

        for side in [1.0f64, -1.0] {
            let j = jit(2.0);
            let m = |p: P3| P3::new(p.x * side, p.y, p.z) + j * if side > 0.0 { 0.0 } else { 1.0 };
            let hip = m(sc(85.0, 0.0, 0.0));
            let head_r = 23.5 * s;
            // Femur: head, neck, greater trochanter, lesser trochanter, hollow shaft.
            femur.push(Shape::Ellipsoid {
                c: hip,
                rot: Matrix3::identity(),
                r: V3::repeat(head_r),
            });
            let gt = m(sc(128.0, 8.0, -30.0));
            femur.push(Shape::Capsule {
                a: hip,
                b: m(sc(118.0, 6.0, -40.0)),
                ra: 16.0 * s,
                rb: 17.0 * s,
            });
            femur.push(ell(gt, V3::new(14.0, 17.0, 20.0) * s));
            femur.push(ell(m(sc(104.0, 14.0, -62.0)), V3::new(9.0, 9.0, 11.0) * s));
            let shaft_a = m(sc(120.0, 8.0, -45.0));
            let shaft_b = m(sc(108.0, 4.0, -240.0));
            femur.push(Shape::Hollow {
                outer: Box::new(Shape::Capsule {
                    a: shaft_a,
                    b: shaft_b,
                    ra: 16.0 * s,
                    rb: 13.5 * s,
                }),
                inner: Box::new(Shape::Capsule {
                    a: shaft_a + (shaft_b - shaft_a) * 0.15,
                    b: shaft_b + V3::new(0.0, 0.0, -20.0),
                    ra: 8.0 * s,
                    rb: 7.5 * s,
                }),
            });

            // Acetabulum: a thick block with the cup for the head (2.5 mm joint space).
            cortical_bone.push(Shape::Cup {
                outer: Box::new(Shape::Ellipsoid {
                    c: m(sc(72.0, 2.0, 4.0)),
                    rot: Matrix3::identity(),
                    r: V3::new(27.0, 30.0, 33.0) * s,
                }),
                c: hip,
                r: head_r + 2.5 * s,
            });

            // Ilium: crest curve from ASIS back to PSIS, base curve from AIIS along the arcuate
            // line to the sacroiliac joint; a curved plate between them (concave medially).
            let asis_lat = if fem { 124.0 } else { 116.0 };
            let crest = [
                sc(asis_lat, -42.0, 62.0),
                sc(asis_lat + 12.0, -22.0, 98.0),
                sc(asis_lat + 8.0, 5.0, 120.0),
                sc(asis_lat - 14.0, 35.0, 126.0),
                sc(68.0, 58.0, 108.0),
                sc(44.0, 72.0, 80.0),
            ]
            .map(m);
            let base = [
                sc(92.0, -28.0, 28.0),
                sc(84.0, -12.0, 30.0),
                sc(78.0, 6.0, 30.0),
                sc(62.0, 30.0, 34.0),
                sc(46.0, 50.0, 42.0),
                sc(40.0, 62.0, 58.0),
            ]
            .map(m);
            let crest_r = [6.5, 7.0, 7.5, 7.5, 7.0, 8.0].map(|r| r * s);
            let asis_dir = (crest[0] - crest[1]).normalize();
            lm[if side > 0.0 { 0 } else { 7 }] = crest[0] + asis_dir * crest_r[0];
            cortical_bone.extend(caps_chain(&crest, &crest_r));
            cortical_bone.extend(caps_chain(
                &base,
                &[11.0, 12.0, 12.0, 11.0, 10.0, 9.0].map(|r| r * s),
            ));
            // The iliac fossa: three rows (base, middle bulging medially, crest), 2 triangles a quad.
            let mid: Vec<P3> = crest
                .iter()
                .zip(&base)
                .map(|(c, b)| {
                    let mp = P3::from((c.coords + b.coords) / 2.0);
                    mp + V3::new(-side * 9.0 * s, 0.0, 0.0)
                })
                .collect();
            for row in [(&base[..], &mid[..]), (&mid[..], &crest[..])] {
                for i in 0..crest.len() - 1 {
                    let (a0, a1, b0, b1) = (row.0[i], row.0[i + 1], row.1[i], row.1[i + 1]);
                    cortical_bone.push(Shape::Slab {
                        t: [a0, a1, b1],
                        half: 3.2 * s,
                    });
                    cortical_bone.push(Shape::Slab {
                        t: [a0, b1, b0],
                        half: 3.2 * s,
                    });
                }
            }
            // Ilium body: from acetabulum up to the plate.
            cortical_bone.push(Shape::Capsule {
                a: m(sc(74.0, 2.0, 10.0)),
                b: m(sc(66.0, 18.0, 40.0)),
                ra: 17.0 * s,
                rb: 13.0 * s,
            });
            cortical_bone.push(Shape::Capsule {
                a: m(sc(70.0, 22.0, 8.0)),
                b: m(sc(48.0, 52.0, 40.0)),
                ra: 13.0 * s,
                rb: 11.0 * s,
            });

            // Obturator ring around the foramen, in a plane turned 35 degrees about z.
            let (fa_w, fa_h) = if fem {
                (19.0 * s, 21.0 * s)
            } else {
                (16.0 * s, 24.0 * s)
            };
            let centre = m(sc(40.0, -30.0, -44.0));
            let yaw = 35f64.to_radians();
            let e1 = V3::new(side * yaw.cos(), yaw.sin(), 0.0); // lateral (and posterior)
            let e2 = V3::new(0.0, 0.0, 1.0);
            let n = 24;
            let tube = |th: f64| {
                // Superior ramus (top) thick, inferior ramus thin, ischium (lateral-low) thick.
                let sup = th.sin().max(0.0);
                let isch =
                    (-(th + 0.5).sin()).max(0.0) * (th.cos() * side.signum()).clamp(0.0, 1.0);
                (6.0 + 5.0 * sup + 5.0 * isch) * s
            };
            let ring: Vec<P3> = (0..=n)
                .map(|i| {
                    let th = i as f64 / n as f64 * std::f64::consts::TAU;
                    let r = tube(th);
                    centre + e1 * ((fa_w + r) * th.cos()) + e2 * ((fa_h + r) * th.sin())
                })
                .collect();
            let ring_r: Vec<f64> = (0..=n)
                .map(|i| tube(i as f64 / n as f64 * std::f64::consts::TAU))
                .collect();
            cortical_bone.extend(caps_chain(&ring, &ring_r));
            lm[if side > 0.0 { 1 } else { 6 }] = centre - e2 * fa_h; // IOF: lowest point of the foramen
            lm[if side > 0.0 { 2 } else { 5 }] = centre - e1 * fa_w; // MOF: its medial-most point
            // Superior ramus to the acetabulum, ischium to the tuberosity.
            cortical_bone.push(Shape::Capsule {
                a: centre + e2 * (fa_h + 6.0 * s) + e1 * (fa_w * 0.4),
                b: m(sc(74.0, -6.0, -8.0)),
                ra: 10.0 * s,
                rb: 14.0 * s,
            });
            let tub = centre
                + e1 * (fa_w + 4.0 * s)
                + e2 * (-fa_h - 4.0 * s)
                + V3::new(0.0, 22.0 * s, 0.0);
            cortical_bone.push(ell(tub, V3::new(13.0, 17.0, 13.0) * s));
            cortical_bone.push(Shape::Capsule {
                a: tub,
                b: m(sc(70.0, 12.0, -14.0)),
                ra: 12.0 * s,
                rb: 15.0 * s,
            });

            // Pubic body: vertical capsule beside the midline; the symphysis gap is 4 mm.
            let (sym_top, sym_bot) = if fem { (-26.0, -60.0) } else { (-24.0, -66.0) };
            let pub_r = 8.0 * s;
            let pub_x = 2.0 * s + pub_r;
            let y_sym = -44.0 * s;
            let pa = P3::new(side * pub_x, y_sym, sym_top * s);
            let pb = P3::new(side * pub_x, y_sym + 6.0 * s, sym_bot * s);
            cortical_bone.push(Shape::Capsule {
                a: pa,
                b: pb,
                ra: pub_r,
                rb: pub_r,
            });
            // Join the pubic body to the ring's medial side (top and bottom rami).
            cortical_bone.push(Shape::Capsule {
                a: pa,
                b: ring[n / 2 - 3],
                ra: 8.0 * s,
                rb: 9.0 * s,
            });
            cortical_bone.push(Shape::Capsule {
                a: pb,
                b: ring[n / 2 + 3],
                ra: 7.0 * s,
                rb: 6.5 * s,
            });
            if side > 0.0 {
                lm[3] = P3::new(0.0, y_sym, sym_top * s); // SPS
                lm[4] = P3::new(0.0, y_sym + 6.0 * s, sym_bot * s); // IPS
            }
        }

        // Sacrum: tapered, curved stack, S1 (wide) to coccyx, with ventral foramina.
        let sac: [(f64, f64, f64, f64, f64); 6] = [
            // (y, z, half-width, half-depth, half-height)
            (52.0, 48.0, 50.0, 22.0, 14.0),
            (60.0, 28.0, 46.0, 18.0, 12.0),
            (68.0, 8.0, 38.0, 15.0, 11.0),
            (76.0, -10.0, 28.0, 12.0, 10.0),
            (82.0, -26.0, 18.0, 10.0, 9.0),
            (84.0, -40.0, 9.0, 7.0, 9.0),
        ];
        // Three ellipsoids between each pair of levels make one continuous tapered body.
        let mut sacrum: Vec<Shape> = sac
            .windows(2)
            .flat_map(|p| {
                (0..3).map(move |q| {
                    let t = q as f64 / 3.0;
                    let l = |a: f64, b: f64| a + (b - a) * t;
                    let (y, z) = (l(p[0].0, p[1].0), l(p[0].1, p[1].1));
                    let r =
                        V3::new(l(p[0].2, p[1].2) * w, l(p[0].3, p[1].3), l(p[0].4, p[1].4)) * s;
                    (sc(0.0, y, z), r)
                })
            })
            .chain(std::iter::once({
                let (y, z, hw, hd, hh) = sac[sac.len() - 1];
                (sc(0.0, y, z), V3::new(hw * w, hd, hh) * s)
            }))
            .map(|(c, r)| ell(c, r))
            .collect();
        // Alae joining the SI joints.
        for side in [1.0, -1.0] {
            sacrum.push(Shape::Capsule {
                a: sc(side * 20.0, 52.0, 46.0),
                b: sc(side * 44.0, 58.0, 48.0),
                ra: 15.0 * s,
                rb: 13.0 * s,
            });
        }
        let foramina: Vec<Shape> = (0..4)
            .flat_map(|i| {
                let (y, z, hw, ..) = sac[i];
                [1.0, -1.0].map(|sd| {
                    ell(
                        sc(sd * hw * 0.45, y - 8.0, z - 8.0),
                        V3::new(4.5, 12.0, 4.5) * s,
                    )
                })
            })
            .collect();
        let sacrum: Vec<Shape> = sacrum
            .into_iter()
            .map(|sh| {
                foramina.iter().fold(sh, |acc, f| Shape::Hollow {
                    outer: Box::new(acc),
                    inner: Box::new(f.clone()),
                })
            })
            .collect();

        // Lumbar vertebrae L5..L3 with discs, posterior arch, spinous and transverse processes.
        let mut spine: Vec<Shape> = Vec::new();
        let mut discs: Vec<Shape> = Vec::new();
        let vert = [(42.0, 80.0), (32.0, 118.0), (26.0, 156.0)];
        let mut prev_top = sc(0.0, 50.0, 62.0);
        for &(y, z) in &vert {
            let c = sc(0.0, y, z);
            spine.push(Shape::Capsule {
                a: c - V3::new(0.0, 0.0, 10.0 * s),
                b: c + V3::new(0.0, 0.0, 10.0 * s),
                ra: 22.0 * s,
                rb: 22.0 * s,
            });
            discs.push(Shape::Capsule {
                a: prev_top,
                b: c - V3::new(0.0, 0.0, 16.0 * s),
                ra: 20.0 * s,
                rb: 20.0 * s,
            });
            prev_top = c + V3::new(0.0, 0.0, 16.0 * s);
            let arch = c + V3::new(0.0, 30.0 * s, 0.0);
            for sd in [1.0, -1.0] {
                spine.push(Shape::Capsule {
                    a: c + V3::new(sd * 12.0 * s, 16.0 * s, 2.0 * s),
                    b: arch + V3::new(sd * 10.0 * s, 6.0 * s, 0.0),
                    ra: 5.5 * s,
                    rb: 5.5 * s,
                });
                spine.push(Shape::Capsule {
                    a: arch + V3::new(sd * 12.0 * s, 0.0, 2.0 * s),
                    b: arch + V3::new(sd * 42.0 * s, 2.0 * s, 4.0 * s),
                    ra: 5.0 * s,
                    rb: 4.0 * s,
                });
            }
            spine.push(Shape::Capsule {
                a: arch + V3::new(0.0, 6.0 * s, 0.0),
                b: arch + V3::new(0.0, 32.0 * s, -10.0 * s),
                ra: 5.5 * s,
                rb: 5.0 * s,
            });
        }
        let symphysis = Shape::Capsule {
            a: lm[3],
            b: lm[4],
            ra: 3.0 * s,
            rb: 3.0 * s,
        };

        let d = params.bone_density as f32;
        let mut bones = vec![
            Bone {
                shapes: cortical_bone,
                cortex_mm: 2.0,
                cortical_hu: 1150.0 * d,
                cancellous_hu: 260.0 * d,
            },
            Bone {
                shapes: femur,
                cortex_mm: 2.5,
                cortical_hu: 1300.0 * d,
                cancellous_hu: 300.0 * d,
            },
            Bone {
                shapes: sacrum,
                cortex_mm: 1.5,
                cortical_hu: 950.0 * d,
                cancellous_hu: 220.0 * d,
            },
            Bone {
                shapes: spine,
                cortex_mm: 1.5,
                cortical_hu: 1000.0 * d,
                cancellous_hu: 200.0 * d,
            },
        ];

        // Whole-pelvis pose: tilt (about x), obliquity (about y), rotation (about z).
        let rot = Rotation3::from_axis_angle(&V3::z_axis(), params.rotation_rad)
            * Rotation3::from_axis_angle(&V3::y_axis(), params.obliquity_rad)
            * Rotation3::from_axis_angle(&V3::x_axis(), params.tilt_rad);
        let lin = *rot.matrix();
        let f = |p: &P3| rot * p;
        for b in &mut bones {
            b.shapes = b.shapes.iter().map(|sh| sh.transformed(&f, &lin)).collect();
        }
        let mut cartilage: Vec<Shape> = discs.iter().map(|sh| sh.transformed(&f, &lin)).collect();
        cartilage.push(symphysis.transformed(&f, &lin));
        let mut landmarks = Landmarks3d::default();
        for (o, p) in landmarks.points.iter_mut().zip(lm) {
            *o = Some(rot * p);
        }

        let bs = params.body_size * s;
        let bladder = ell(rot * sc(0.0, -10.0, -20.0), V3::new(32.0, 26.0, 24.0) * s);
        let gas = vec![
            ell(rot * sc(-40.0, -40.0, 120.0), V3::new(22.0, 14.0, 12.0) * s),
            ell(rot * sc(55.0, -30.0, 95.0), V3::new(15.0, 10.0, 18.0) * s),
            ell(rot * sc(10.0, -60.0, 150.0), V3::new(30.0, 12.0, 10.0) * s),
        ];
        let body = (0.0, 15.0 * s, 165.0 * bs * w, 120.0 * bs);
        let (a, b) = (body.2 + params.fat_mm, body.3 + params.fat_mm);
        let bounds = (
            P3::new(-a - 10.0, body.1 - b - 10.0, -130.0 * s),
            P3::new(a + 10.0, body.1 + b + 10.0, 180.0 * s),
        );
        Self {
            params: params.clone(),
            bones,
            cartilage,
            bladder,
            gas,
            body,
            landmarks,
            bounds,
        }
    }

    /// HU at a point (no anti-aliasing).
    fn hu_at(&self, p: &P3, half_voxel: f64, bone_bounds: &[Vec<(P3, P3)>]) -> f32 {
        // Soft tissue first.
        let (cx, cy, a, b) = self.body;
        let e = ((p.x - cx) / a).powi(2) + ((p.y - cy) / b).powi(2);
        let fat = self.params.fat_mm;
        let ef = ((p.x - cx) / (a + fat)).powi(2) + ((p.y - cy) / (b + fat)).powi(2);
        let mut hu = if e <= 1.0 {
            MUSCLE_HU
        } else if ef <= 1.0 {
            FAT_HU
        } else {
            AIR_HU
        };
        if hu == MUSCLE_HU {
            if self.bladder.sdf(p) < 0.0 {
                hu = FLUID_HU;
            }
            if self.gas.iter().any(|g| g.sdf(p) < 0.0) {
                hu = GAS_HU;
            }
        }
        if self.cartilage.iter().any(|c| c.sdf(p) < 0.0) {
            hu = DISC_HU;
        }
        // Bones: the nearest surface decides; a linear ramp over one voxel anti-aliases edges.
        for (bone, bb) in self.bones.iter().zip(bone_bounds) {
            let mut dmin = f64::INFINITY;
            for (sh, (lo, hi)) in bone.shapes.iter().zip(bb) {
                if p.x < lo.x - half_voxel
                    || p.y < lo.y - half_voxel
                    || p.z < lo.z - half_voxel
                    || p.x > hi.x + half_voxel
                    || p.y > hi.y + half_voxel
                    || p.z > hi.z + half_voxel
                {
                    continue;
                }
                dmin = dmin.min(sh.sdf(p));
            }
            if dmin < half_voxel {
                let cover = ((half_voxel - dmin) / (2.0 * half_voxel)).clamp(0.0, 1.0) as f32;
                let inner =
                    ((-dmin - bone.cortex_mm) / (2.0 * half_voxel) + 0.5).clamp(0.0, 1.0) as f32;
                let bone_hu = bone.cortical_hu + (bone.cancellous_hu - bone.cortical_hu) * inner;
                let base = if hu < FAT_HU { MUSCLE_HU } else { hu };
                hu = base + (bone_hu - base) * cover;
            }
        }
        hu
    }

    /// Rasterises to a volume (LPS, identity direction) at `params.spacing_mm`.
    /// The voxel grid [`Phantom::rasterize`] fills: dimensions, origin (LPS mm) and spacing.
    fn grid(&self) -> ([usize; 3], V3, f64) {
        let sp = self.params.spacing_mm.max(0.25);
        let (lo, hi) = self.bounds;
        let dims = [0, 1, 2].map(|a| (((hi[a] - lo[a]) / sp).ceil() as usize).max(1));
        (dims, lo.coords + V3::repeat(sp / 2.0), sp)
    }

    /// The centre of the rasterised volume ([`Volume::center_mm`]), bit for bit, without
    /// rasterising: the grid's voxels stay zero pages that are never touched.
    pub fn grid_center_mm(&self) -> P3 {
        let (dims, origin, sp) = self.grid();
        let n = dims[0] * dims[1] * dims[2];
        Volume::new(dims, [sp; 3], origin, Matrix3::identity(), vec![0.0; n])
            .map_or_else(|_| P3::from(origin), |v| v.center_mm())
    }

    pub fn rasterize(&self) -> Volume {
        let (dims, origin, sp) = self.grid();
        let bone_bounds: Vec<Vec<(P3, P3)>> = self
            .bones
            .iter()
            .map(|b| b.shapes.iter().map(Shape::bounds).collect())
            .collect();
        let plane = dims[0] * dims[1];
        let mut hu = vec![0.0f32; plane * dims[2]];
        hu.par_chunks_mut(dims[0])
            .enumerate()
            .for_each(|(row, out)| {
                let (j, k) = (row % dims[1], row / dims[1]);
                for (i, o) in out.iter_mut().enumerate() {
                    let p = P3::from(origin + V3::new(i as f64, j as f64, k as f64) * sp);
                    *o = self.hu_at(&p, sp / 2.0, &bone_bounds);
                }
            });
        let mut v = Volume::new(dims, [sp; 3], origin, Matrix3::identity(), hu)
            .expect("phantom bounds are finite and positive");
        let p = &self.params;
        v.meta = VolumeMeta {
            source: format!("phantom:{}", p.subject),
            modality: "CT".into(),
            series_uid: None,
            description: format!(
                "fluoropose pelvis phantom, subject {} ({}), scale {:.3}, tilt {:.1} deg",
                p.subject,
                if p.female { "F" } else { "M" },
                p.scale,
                p.tilt_rad.to_degrees()
            ),
            warnings: Vec::new(),
        };
        v
    }
}

/// The phantom of one subject, rasterised, with its landmarks.
pub fn phantom_subject(id: u64, spacing_mm: Option<f64>) -> (Volume, Landmarks3d) {
    let ph = subject_phantom(id, spacing_mm);
    (ph.rasterize(), ph.landmarks.clone())
}

/// A phantom subject's landmarks and the centre of its CT ([`Volume::center_mm`]), without
/// rasterising it: what a dataset's manifest needs of each subject, in a small fraction of
/// the time.
pub fn phantom_outline(id: u64, spacing_mm: Option<f64>) -> (Landmarks3d, P3) {
    let ph = subject_phantom(id, spacing_mm);
    (ph.landmarks.clone(), ph.grid_center_mm())
}

fn subject_phantom(id: u64, spacing_mm: Option<f64>) -> Phantom {
    let mut p = PhantomParams::subject(id);
    if let Some(s) = spacing_mm {
        p.spacing_mm = s;
    }
    Phantom::new(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triangle_distance() {
        let t = [
            P3::new(0.0, 0.0, 0.0),
            P3::new(1.0, 0.0, 0.0),
            P3::new(0.0, 1.0, 0.0),
        ];
        assert!((dist_triangle(&P3::new(0.2, 0.2, 3.0), &t) - 3.0).abs() < 1e-12);
        assert!((dist_triangle(&P3::new(-1.0, 0.0, 0.0), &t) - 1.0).abs() < 1e-12);
        assert!((dist_triangle(&P3::new(1.0, 1.0, 0.0), &t) - 0.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_outline_matches_the_rasterised_subject() {
        for id in [1, 7, 480] {
            let (vol, lm) = phantom_subject(id, Some(3.0));
            let (lm2, c) = phantom_outline(id, Some(3.0));
            assert_eq!(lm, lm2);
            // Bit for bit: a dataset's manifest written from one is resumed with the other.
            assert_eq!(vol.center_mm(), c, "subject {id}");
        }
    }

    #[test]
    fn subjects_differ_and_are_reproducible() {
        let a = PhantomParams::subject(3);
        assert_eq!(a, PhantomParams::subject(3));
        assert_ne!(a, PhantomParams::subject(4));
        let la = Phantom::new(&a).landmarks;
        let lb = Phantom::new(&PhantomParams::subject(4)).landmarks;
        assert_ne!(la, lb);
    }

    #[test]
    fn landmarks_are_anatomically_placed() {
        for id in 0..6 {
            let ph = Phantom::new(&PhantomParams::subject(id));
            let l = ph.landmarks.all().unwrap();
            let tilt = Rotation3::from_axis_angle(&V3::x_axis(), ph.params.tilt_rad).inverse();
            let l: Vec<P3> = l.iter().map(|p| tilt * p).collect();
            // Left landmarks at +x (LPS), right at -x, symphysis at the midline.
            assert!(l[0].x > 90.0 && l[7].x < -90.0, "ASIS width");
            for (lft, rgt) in [(1, 6), (2, 5)] {
                assert!(l[lft].x > 15.0 && l[rgt].x < -15.0);
            }
            assert!(l[3].x.abs() < 8.0 && l[4].x.abs() < 8.0);
            // ASIS above the symphysis, SPS above IPS, IOF below MOF.
            assert!(l[0].z > l[3].z + 60.0 && l[3].z > l[4].z + 20.0);
            assert!(l[1].z < l[2].z && l[6].z < l[5].z);
            // MOF medial to IOF.
            assert!(l[2].x < l[1].x && l[5].x > l[6].x);
        }
    }

    #[test]
    fn landmarks_sit_on_bone() {
        let (vol, lm) = phantom_subject(2, Some(1.5));
        for p in lm.all().unwrap() {
            let ijk = vol.world_to_voxel(p);
            // Some voxel within 2 voxels is bone.
            let mut max_hu = f32::MIN;
            for di in -2i64..=2 {
                for dj in -2i64..=2 {
                    for dk in -2i64..=2 {
                        let (i, j, k) = (
                            ijk.x.round() as i64 + di,
                            ijk.y.round() as i64 + dj,
                            ijk.z.round() as i64 + dk,
                        );
                        if let Some(v) = vol.get(i as usize, j as usize, k as usize) {
                            max_hu = max_hu.max(v);
                        }
                    }
                }
            }
            assert!(
                max_hu > 300.0,
                "landmark {p} is not on bone (max {max_hu} HU)"
            );
        }
    }

    #[test]
    fn hu_ranges_are_ct_like() {
        let (vol, _) = phantom_subject(0, Some(4.0));
        let (lo, hi) = vol.hu_range();
        assert_eq!(lo, AIR_HU);
        assert!(hi > 900.0 && hi < 1600.0);
        let bone = vol.hu().iter().filter(|v| **v > 300.0).count() as f64 / vol.hu().len() as f64;
        assert!(bone > 0.005 && bone < 0.1, "bone fraction {bone}");
    }
}
