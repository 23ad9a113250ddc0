//! The paper's registration, reproduced for comparison (section 2.3): eq. 4 minimised from
//! r = 0, t = 0 by Adam (lr 1e-3, 100 iterations), with r clamped to [-2π, 2π] and t to a box;
//! and the L-BFGS variant sections 2.2 and 2.4 name. Gradients are exact (the analytic Jacobian
//! of eqs. 5-8), so this matches what autograd computes. Generic over f32 and f64; deterministic.

use super::Problem;
use super::jacobian::project_with_jacobian_t;
use nalgebra::{Point3, RealField, Vector3, Vector6};

/// Settings of the paper's optimisers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaperOptions {
    /// Iterations (paper: 100).
    pub iterations: usize,
    /// Adam learning rate (paper: 1e-3).
    pub lr: f64,
    /// |r| components are clamped to this (paper: 2π).
    pub r_bound: f64,
    /// Lower corner of the translation box, mm.
    pub t_min: [f64; 3],
    /// Upper corner of the translation box, mm.
    pub t_max: [f64; 3],
}

impl Default for PaperOptions {
    /// The paper's settings. Its "physically reasonable bounds" on t are taken as the region a
    /// C-arm occupies: ±500 mm across the beam, 0..2000 mm along it.
    fn default() -> Self {
        Self {
            iterations: 100,
            lr: 1e-3,
            r_bound: 2.0 * std::f64::consts::PI,
            t_min: [-500.0, -500.0, 0.0],
            t_max: [500.0, 500.0, 2000.0],
        }
    }
}

/// Result of a paper-style solve.
#[derive(Clone, Debug, PartialEq)]
pub struct PaperResult<T> {
    /// (rx, ry, rz, tx, ty, tz).
    pub theta: [T; 6],
    /// Eq. 4 at the end (sum of squared residuals, px²).
    pub loss: T,
    /// Iterations run.
    pub iterations: usize,
}

/// Eq. 4 and its gradient at θ, in float type T.
pub fn loss_and_grad<T: RealField + Copy>(pb: &Problem, theta: &Vector6<T>) -> (T, Vector6<T>) {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let r = Vector3::new(theta[0], theta[1], theta[2]);
    let t = Vector3::new(theta[3], theta[4], theta[5]);
    let mut loss = T::zero();
    let mut g = Vector6::zeros();
    for i in 0..pb.points3d.len() {
        let Some(l) = pb.points2d[i] else { continue };
        let w = c(pb.weight(i));
        let p = pb.points3d[i].coords.map(c);
        let (uv, j) = project_with_jacobian_t(pb.camera, &r, &t, &Point3::from(p));
        let res = nalgebra::Vector2::new(uv.x - c(l.x), uv.y - c(l.y));
        loss += w * res.norm_squared();
        g += j.transpose() * res * (w * c(2.0));
    }
    (loss, g)
}

fn clamp<T: RealField + Copy>(theta: &mut Vector6<T>, o: &PaperOptions) {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    for k in 0..3 {
        theta[k] = theta[k].clamp(c(-o.r_bound), c(o.r_bound));
        theta[3 + k] = theta[3 + k].clamp(c(o.t_min[k]), c(o.t_max[k]));
    }
}

fn to_array<T: Copy>(v: &Vector6<T>) -> [T; 6] {
    [v[0], v[1], v[2], v[3], v[4], v[5]]
}

/// Adam on eq. 4 from `init` (the paper: zeros).
pub fn adam<T: RealField + Copy>(pb: &Problem, init: [f64; 6], o: &PaperOptions) -> PaperResult<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let (b1, b2, eps, lr) = (c(0.9), c(0.999), c(1e-8), c(o.lr));
    let mut theta = Vector6::from_iterator(init.iter().map(|&x| c(x)));
    let (mut m, mut v) = (Vector6::<T>::zeros(), Vector6::<T>::zeros());
    let (mut b1t, mut b2t) = (T::one(), T::one());
    for _ in 0..o.iterations {
        let (_, g) = loss_and_grad(pb, &theta);
        b1t *= b1;
        b2t *= b2;
        for k in 0..6 {
            m[k] = b1 * m[k] + (T::one() - b1) * g[k];
            v[k] = b2 * v[k] + (T::one() - b2) * g[k] * g[k];
            let mh = m[k] / (T::one() - b1t);
            let vh = v[k] / (T::one() - b2t);
            theta[k] -= lr * mh / (vh.sqrt() + eps);
        }
        clamp(&mut theta, o);
    }
    let (loss, _) = loss_and_grad(pb, &theta);
    PaperResult {
        theta: to_array(&theta),
        loss,
        iterations: o.iterations,
    }
}

/// L-BFGS (history 10, backtracking Armijo line search) on eq. 4 from `init`, projected onto the
/// same bounds, for at most `o.iterations` iterations.
pub fn lbfgs<T: RealField + Copy>(
    pb: &Problem,
    init: [f64; 6],
    o: &PaperOptions,
) -> PaperResult<T> {
    let c = |x: f64| nalgebra::convert::<f64, T>(x);
    let mut x = Vector6::from_iterator(init.iter().map(|&v| c(v)));
    clamp(&mut x, o);
    let (mut f, mut g) = loss_and_grad(pb, &x);
    let mut hist: Vec<(Vector6<T>, Vector6<T>, T)> = Vec::new();
    let mut it = 0;
    while it < o.iterations {
        it += 1;
        if g.amax() < c(1e-7) {
            break;
        }
        // Two-loop recursion.
        let mut q = g;
        let mut alphas = Vec::with_capacity(hist.len());
        for (s, y, rho) in hist.iter().rev() {
            let a = *rho * s.dot(&q);
            q -= y * a;
            alphas.push(a);
        }
        let gamma = hist.last().map_or_else(
            || T::one() / g.norm().max(c(1e-12)),
            |(s, y, _)| s.dot(y) / y.dot(y),
        );
        let mut d = q * gamma;
        for ((s, y, rho), a) in hist.iter().zip(alphas.iter().rev()) {
            let b = *rho * y.dot(&d);
            d += s * (*a - b);
        }
        let mut dir = -d;
        if dir.dot(&g) >= T::zero() {
            dir = -g;
            hist.clear();
        }
        let mut step = T::one();
        let slope = dir.dot(&g);
        let mut accepted = None;
        for _ in 0..40 {
            let mut xn = x + dir * step;
            clamp(&mut xn, o);
            let (fnew, gnew) = loss_and_grad(pb, &xn);
            if fnew <= f + c(1e-4) * step * slope {
                accepted = Some((xn, fnew, gnew));
                break;
            }
            step *= c(0.5);
        }
        let Some((xn, fnew, gnew)) = accepted else {
            break;
        };
        let (s, y) = (xn - x, gnew - g);
        let sy = s.dot(&y);
        if sy > c(1e-12) {
            hist.push((s, y, T::one() / sy));
            if hist.len() > 10 {
                hist.remove(0);
            }
        }
        let change = (f - fnew).abs();
        (x, f, g) = (xn, fnew, gnew);
        if change < c(1e-9) * f.max(T::one()) {
            break;
        }
    }
    PaperResult {
        theta: to_array(&x),
        loss: f,
        iterations: it,
    }
}
