// Turns one float DRR of a batch into display pixels: window/level, optional inversion and
// Beer-Lambert intensity, written to an rgba8unorm storage texture that egui shows directly
// (no CPU round trip). Keep in sync with `WindowUniforms` in src/drr/gpu.rs.

struct WindowUniforms {
    // image width, height, index of the image in the batch, flags (bit 0: invert, bit 1: exp(-x))
    size: vec4<u32>,
    // window low, window high, tint r, tint g
    window: vec4<f32>,
    // tint b, alpha, unused, unused
    tint: vec4<f32>,
};

@group(0) @binding(0) var<uniform> w: WindowUniforms;
@group(0) @binding(1) var<storage, read> drr: array<f32>;
@group(0) @binding(2) var out: texture_storage_2d<rgba8unorm, write>;

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= w.size.x || gid.y >= w.size.y) {
        return;
    }
    var v = drr[w.size.z * w.size.x * w.size.y + gid.y * w.size.x + gid.x];
    if ((w.size.w & 2u) != 0u) {
        v = exp(-v);
    }
    var g = clamp((v - w.window.x) / max(w.window.y - w.window.x, 1e-20), 0.0, 1.0);
    if ((w.size.w & 1u) != 0u) {
        g = 1.0 - g;
    }
    let rgb = g * vec3<f32>(w.window.z, w.window.w, w.tint.x);
    textureStore(out, vec2<i32>(gid.xy), vec4<f32>(rgb, w.tint.y));
}
