// Shared by drr_siddon.wgsl and drr_trilinear.wgsl (prepended to each at load time).
// Keep in sync with `DrrUniforms` and `GpuPose` in src/drr/gpu.rs (layout test there).

struct DrrUniforms {
    // nx, ny, nz, number of poses in the batch
    dims: vec4<u32>,
    // image width, height, flags (bit 0: whole line, bit 1: DiffDRR sample spacing), samples per ray
    image: vec4<u32>,
    // voxel spacing (mm) x, y, z; trilinear step along the ray (mm)
    spacing: vec4<f32>,
    // The box of non-zero voxels in continuous voxel coordinates, [lo - 0.5, hi + 0.5]: Siddon
    // rays are clipped to it (air adds nothing but steps). xyz used.
    box_lo: vec4<f32>,
    box_hi: vec4<f32>,
};

// One C-arm pose, everything in continuous voxel coordinates (integers at voxel centres).
// The ray of pixel (c, r) runs from `source.xyz` to `origin.xyz + (c + 0.5) du + (r + 0.5) dv`.
// `source.w`, `origin.w`: DiffDRR's trilinear parameter range for this pose, shared by all its
// rays (lo, hi).
struct GpuPose {
    source: vec4<f32>,
    origin: vec4<f32>,
    du: vec4<f32>,
    dv: vec4<f32>,
};

@group(0) @binding(0) var<uniform> u: DrrUniforms;
@group(0) @binding(1) var<storage, read> poses: array<GpuPose>;
// The attenuation volume, in one of two places chosen by the renderer per volume (the other
// gets a one-voxel stand-in), measured on lavapipe (the software Vulkan of CPU-only machines):
// - a storage buffer (`VOLUME_IN_BUFFER`) holding only the box of non-zero voxels (`u.box_lo`,
//   `u.box_hi`), x fastest, when that fits the device's storage binding limit: plain loads,
//   1.2-1.8x faster than texel fetches there (a 512x512x133 chest CT at 768 px: see the
//   README), and a CT's air around the body costs no memory;
// - else an r32float 3D texture of the whole grid read with textureLoad only (exact values;
//   r32float is not filterable everywhere, and the trilinear shader interpolates itself),
//   bounded by the 3D texture dimension limit (2048 per side) rather than by the storage limit
//   (128 MiB on many devices). Splitting a larger volume over several buffers was tried and
//   was 1.5-2x slower than the texture on lavapipe (a branch or select per voxel).
@group(0) @binding(2) var density: texture_3d<f32>;
@group(0) @binding(3) var<storage, read_write> image: array<f32>;
@group(0) @binding(4) var<storage, read> density_buf: array<f32>;
// Fixed when the pipeline is made, so that each pipeline keeps one branch of `voxel`.
override VOLUME_IN_BUFFER: bool = false;

const FLAG_FULL_LINE: u32 = 1u;
const FLAG_DIFFDRR_SAMPLES: u32 = 2u;

// The voxel at integer index i (inside the volume: callers clamp or stop at the box).
// First and last voxel index of the box of non-zero voxels (inclusive; empty when lo > hi).
fn box_first() -> vec3<i32> {
    return vec3<i32>(round(u.box_lo.xyz + vec3<f32>(0.5)));
}
fn box_last() -> vec3<i32> {
    return vec3<i32>(round(u.box_hi.xyz - vec3<f32>(0.5)));
}

// The voxel at integer index i, which callers keep inside the box of non-zero voxels (every
// voxel outside it is zero).
fn voxel(i: vec3<i32>) -> f32 {
    if (VOLUME_IN_BUFFER) {
        let lo = box_first();
        let n = vec3<u32>(box_last() - lo + vec3<i32>(1));
        let j = vec3<u32>(i - lo);
        return density_buf[j.x + n.x * (j.y + n.y * j.z)];
    }
    return textureLoad(density, i, 0).x;
}

// Parameter range [lo, hi] where the ray s + a d is inside the box [b0, b1], intersected with
// [lo0, hi0]. Empty when lo >= hi.
fn clip_to_box(s: vec3<f32>, d: vec3<f32>, lo0: f32, hi0: f32, b0: vec3<f32>, b1: vec3<f32>) -> vec2<f32> {
    var lo = lo0;
    var hi = hi0;
    for (var a = 0u; a < 3u; a++) {
        if (abs(d[a]) < 1e-12) {
            if (s[a] < b0[a] || s[a] > b1[a]) {
                return vec2<f32>(1.0, 0.0);
            }
            continue;
        }
        let a0 = (b0[a] - s[a]) / d[a];
        let a1 = (b1[a] - s[a]) / d[a];
        lo = max(lo, min(a0, a1));
        hi = min(hi, max(a0, a1));
    }
    return vec2<f32>(lo, hi);
}

// The same for the whole grid, [-0.5, n - 0.5].
fn clip_to_grid(s: vec3<f32>, d: vec3<f32>, lo0: f32, hi0: f32) -> vec2<f32> {
    return clip_to_box(s, d, lo0, hi0, vec3<f32>(-0.5), vec3<f32>(u.dims.xyz) - vec3<f32>(0.5));
}

// The ray of this invocation's pixel, or false when it is outside the image or batch.
struct Ray {
    s: vec3<f32>,
    d: vec3<f32>,
    out_index: u32,
    length_mm: f32,
    // DiffDRR's trilinear parameter range of this pose.
    alpha: vec2<f32>,
};

fn pixel_ray(gid: vec3<u32>) -> Ray {
    let p = poses[gid.z];
    let s = p.source.xyz;
    let t = p.origin.xyz + (f32(gid.x) + 0.5) * p.du.xyz + (f32(gid.y) + 0.5) * p.dv.xyz;
    let d = t - s;
    // The direction cosines are orthonormal, so world length = |spacing * d_voxel|.
    let len = length(d * u.spacing.xyz);
    let idx = gid.z * u.image.x * u.image.y + gid.y * u.image.x + gid.x;
    return Ray(s, d, idx, len, vec2<f32>(p.source.w, p.origin.w));
}

fn in_range(gid: vec3<u32>) -> bool {
    return gid.x < u.image.x && gid.y < u.image.y && gid.z < u.dims.w;
}
