//! Registration as a differentiable candle layer: 2D landmarks `(B, N, 2)` in, poses `(B, 6)`
//! `(rx, ry, rz, tx, ty, tz)` out, with the implicit-function-theorem gradient
//! ([`super::implicit`]) as its backward pass, so that the pose estimation loss of eq. 10
//! reaches the U-Net's soft-argmax.
//!
//! The solver runs on the CPU (8 points, microseconds); on another device the tensor is copied
//! over and back, and candle carries the gradient through the copies.

use super::implicit::{SecondOrder, pose_jacobian_wrt_points};
use super::{LmOptions, Problem, solve, solve_from};
use crate::geometry::{Camera, Pose};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use nalgebra::{Point2, Point3};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The per-batch-item data the solve needs besides the 2D points.
#[derive(Clone, Debug)]
pub struct RegistrationLayer {
    /// Camera of the images the 2D points are measured in.
    pub camera: Camera,
    /// 3D landmarks of each batch item's CT (LPS mm), N each.
    pub points3d: Vec<Vec<Point3<f64>>>,
    /// Optional per-landmark weights per item.
    pub weights: Option<Vec<Vec<f64>>>,
    /// Optional start poses per item (e.g. the previous frame's); `None`: the robust start.
    pub init: Option<Vec<Pose>>,
    /// Solver options.
    pub options: LmOptions,
    /// Which Hessian the backward pass uses.
    pub second_order: SecondOrder,
    /// Items whose solve failed (their pose is zero and their gradient zero).
    pub failures: Arc<AtomicUsize>,
}

impl RegistrationLayer {
    /// A layer for `points3d.len()` items seen through `camera`.
    pub fn new(camera: Camera, points3d: Vec<Vec<Point3<f64>>>) -> Self {
        Self {
            camera,
            points3d,
            weights: None,
            init: None,
            options: LmOptions::default(),
            second_order: SecondOrder::Full,
            failures: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Solves every item: `(B, N, 2)` -> `(B, 6)`, differentiable.
    pub fn forward(&self, landmarks: &Tensor) -> candle_core::Result<Tensor> {
        let device = landmarks.device().clone();
        let x = landmarks.to_device(&Device::Cpu)?.contiguous()?;
        let y = x.apply_op1(self.clone())?;
        y.to_device(&device)
    }

    fn problem<'a>(&'a self, b: usize, l: &'a [Option<Point2<f64>>]) -> Problem<'a> {
        Problem {
            camera: &self.camera,
            points3d: &self.points3d[b],
            points2d: l,
            weights: self.weights.as_ref().map(|w| w[b].as_slice()),
        }
    }

    fn points(data: &[f64], b: usize, n: usize) -> Vec<Option<Point2<f64>>> {
        (0..n)
            .map(|i| {
                Some(Point2::new(
                    data[(b * n + i) * 2],
                    data[(b * n + i) * 2 + 1],
                ))
            })
            .collect()
    }
}

fn to_f64(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<f64>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("registration layer: input must be contiguous".into())
    })?;
    Ok(match storage {
        CpuStorage::F32(v) => v[start..end].iter().map(|x| *x as f64).collect(),
        CpuStorage::F64(v) => v[start..end].to_vec(),
        _ => {
            return Err(candle_core::Error::Msg(
                "registration layer: landmarks must be f32 or f64".into(),
            ));
        }
    })
}

impl CustomOp1 for RegistrationLayer {
    fn name(&self) -> &'static str {
        "landmark-registration"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let [b, n, 2] = dims else {
            return Err(candle_core::Error::Msg(format!(
                "registration layer: expected (B, N, 2) landmarks, got {dims:?}"
            )));
        };
        let (b, n) = (*b, *n);
        if self.points3d.len() != b || self.points3d.iter().any(|p| p.len() != n) {
            return Err(candle_core::Error::Msg(format!(
                "registration layer: {b} items of {n} landmarks, but the 3D points do not match"
            )));
        }
        let data = to_f64(storage, layout)?;
        let mut out = vec![0.0f64; b * 6];
        for item in 0..b {
            let l = Self::points(&data, item, n);
            let pb = self.problem(item, &l);
            let s = match &self.init {
                Some(init) => solve_from(&pb, &init[item], &self.options),
                None => solve(&pb, &self.options),
            };
            if s.status.ok() {
                out[item * 6..item * 6 + 6].copy_from_slice(&s.pose.params());
            } else {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let storage = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(out.iter().map(|v| *v as f32).collect()),
            _ => CpuStorage::F64(out),
        };
        Ok((storage, Shape::from((b, 6))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, n, _) = arg.dims3()?;
        let l: Vec<f64> = arg.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let poses: Vec<f64> = res.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let g: Vec<f64> = grad_res.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let mut grad = vec![0.0f64; b * n * 2];
        for item in 0..b {
            let p: [f64; 6] = std::array::from_fn(|k| poses[item * 6 + k]);
            if p.iter().all(|v| *v == 0.0) {
                continue; // a failed solve: no gradient
            }
            let pose = Pose::from_params(&p);
            let pts = Self::points(&l, item, n);
            let pb = self.problem(item, &pts);
            // The landmarks the forward solve trusted: those within the outlier threshold.
            let inliers: Vec<bool> = (0..n)
                .map(|i| {
                    pb.weight(i) > 0.0
                        && (self.camera.project(&pose, &pb.points3d[i])
                            - pts[i].unwrap_or(Point2::origin()))
                        .norm()
                            < self.options.outlier_px
                })
                .collect();
            let Some(jac) = pose_jacobian_wrt_points(&pb, &inliers, &pose, self.second_order)
            else {
                continue;
            };
            let gr = nalgebra::DVector::from_row_slice(&g[item * 6..item * 6 + 6]);
            let gl = jac.transpose() * gr;
            grad[item * n * 2..(item + 1) * n * 2].copy_from_slice(gl.as_slice());
        }
        Tensor::from_vec(grad, (b, n, 2), &Device::Cpu)?
            .to_dtype(arg.dtype())
            .map(Some)
    }
}
