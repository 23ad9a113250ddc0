//! One interface over the DRR renderers, for code that needs images rather than a device: the
//! simulated stream, dataset generation and intensity-based registration.

use crate::geometry::{Camera, Pose};

/// Anything that renders a line-integral DRR (the GPU renderer, or the CPU reference).
pub trait DrrSource {
    /// Renders one image at `pose`.
    fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String>;

    /// Renders one image per pose. The GPU renders the batch in one pass (one submission and
    /// one readback), which is what a finite-difference Jacobian of six poses wants.
    fn render_batch(&mut self, camera: &Camera, poses: &[Pose]) -> Result<Vec<Vec<f32>>, String> {
        poses.iter().map(|p| self.render(camera, p)).collect()
    }
}

impl<T: DrrSource + ?Sized> DrrSource for Box<T> {
    fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String> {
        (**self).render(camera, pose)
    }
    fn render_batch(&mut self, camera: &Camera, poses: &[Pose]) -> Result<Vec<Vec<f32>>, String> {
        (**self).render_batch(camera, poses)
    }
}

/// The CPU reference as a [`DrrSource`].
pub struct CpuDrr {
    /// The attenuation volume (physical attenuation for realistic noise).
    pub volume: std::sync::Arc<super::DensityVolume>,
    /// Ray integral.
    pub renderer: super::cpu::Renderer,
}

impl DrrSource for CpuDrr {
    fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String> {
        Ok(super::cpu::render(
            &self.volume,
            camera,
            pose,
            self.renderer,
        ))
    }
}

impl DrrSource for super::gpu::DrrRenderer {
    fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String> {
        self.render_batch(camera, std::slice::from_ref(pose))?
            .pop()
            .ok_or_else(|| "the GPU returned no image".to_string())
    }
    fn render_batch(&mut self, camera: &Camera, poses: &[Pose]) -> Result<Vec<Vec<f32>>, String> {
        super::gpu::DrrRenderer::render(
            self,
            camera,
            poses,
            super::cpu::Renderer::Siddon { full_line: false },
        )
        .map_err(|e| e.to_string())
    }
}

/// The GPU renderer when an adapter works, else the CPU reference: one volume at a time, for
/// headless work that walks through several CTs (dataset generation, evaluation).
pub struct AnyDrr {
    gpu: Option<super::gpu::DrrRenderer>,
    cpu: Option<CpuDrr>,
    gpu_failed: bool,
}

impl AnyDrr {
    /// No volume yet; `cpu_only` skips the GPU.
    pub fn new(cpu_only: bool) -> Self {
        Self {
            gpu: None,
            cpu: None,
            gpu_failed: cpu_only,
        }
    }

    /// Renders `volume` from now on: on the GPU if one works (the first failure is logged and
    /// the CPU reference takes over for good), else on the CPU.
    pub fn set_volume(&mut self, volume: std::sync::Arc<super::DensityVolume>) {
        if !self.gpu_failed {
            let ready = match self.gpu.as_mut() {
                Some(r) => r.set_volume(volume.clone()).map_err(|e| e.to_string()),
                None => super::gpu::headless_device(false)
                    .map_err(|e| e.to_string())
                    .and_then(|(d, q, _)| {
                        let mut r = super::gpu::DrrRenderer::new(&d, &q);
                        r.set_volume(volume.clone()).map_err(|e| e.to_string())?;
                        self.gpu = Some(r);
                        Ok(())
                    }),
            };
            if let Err(e) = ready {
                log::warn!("no GPU renderer ({e}); rendering on the CPU reference");
                self.gpu_failed = true;
                self.gpu = None;
            }
        }
        self.cpu = self.gpu_failed.then_some(CpuDrr {
            volume,
            renderer: super::cpu::Renderer::Siddon { full_line: false },
        });
    }

    /// Whether images come from the GPU.
    pub fn on_gpu(&self) -> bool {
        self.gpu.is_some() && !self.gpu_failed
    }

    fn active(&mut self) -> Result<&mut dyn DrrSource, String> {
        match (self.gpu.as_mut(), self.cpu.as_mut()) {
            (Some(g), _) if !self.gpu_failed => Ok(g),
            (_, Some(c)) => Ok(c),
            _ => Err("no volume to render".into()),
        }
    }
}

impl DrrSource for AnyDrr {
    fn render(&mut self, camera: &Camera, pose: &Pose) -> Result<Vec<f32>, String> {
        self.active()?.render(camera, pose)
    }
    fn render_batch(&mut self, camera: &Camera, poses: &[Pose]) -> Result<Vec<Vec<f32>>, String> {
        self.active()?.render_batch(camera, poses)
    }
}
