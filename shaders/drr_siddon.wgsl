// Siddon-Jacobs exact radiological path: every voxel the ray crosses, weighted by the length of
// the crossing. Mirrors `siddon_ray_within` in src/drr/cpu.rs (the CPU reference). The next plane
// crossing on each axis is computed from the voxel index, not accumulated, so that f32 rounding
// does not drift along the ray.
// (drr_common.wgsl is prepended.)

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (!in_range(gid)) {
        return;
    }
    let ray = pixel_ray(gid);
    let s = ray.s;
    let d = ray.d;
    let full = (u.image.z & FLAG_FULL_LINE) != 0u;
    let range = clip_to_grid(s, d, select(0.0, -3.0e38, full), select(1.0, 3.0e38, full));
    let amin = range.x;
    let amax = range.y;
    if (amin >= amax) {
        image[ray.out_index] = 0.0;
        return;
    }
    let n = vec3<i32>(u.dims.xyz);
    let a_in = amin + 1e-6 * (amax - amin);
    var idx = vec3<i32>(0, 0, 0);
    var stp = vec3<i32>(0, 0, 0);
    var nxt = vec3<f32>(3.0e38, 3.0e38, 3.0e38);
    var inv = vec3<f32>(0.0, 0.0, 0.0);
    for (var a = 0u; a < 3u; a++) {
        let p = s[a] + d[a] * a_in;
        idx[a] = clamp(i32(floor(p + 0.5)), 0, n[a] - 1);
        if (abs(d[a]) >= 1e-12) {
            stp[a] = select(-1, 1, d[a] > 0.0);
            inv[a] = 1.0 / d[a];
            nxt[a] = (f32(idx[a]) + 0.5 * f32(stp[a]) - s[a]) * inv[a];
        }
    }
    var acc = 0.0;
    var cur = amin;
    let max_steps = u.dims.x + u.dims.y + u.dims.z + 3u;
    for (var it = 0u; it < max_steps; it++) {
        var axis = 2u;
        if (nxt.x <= nxt.y && nxt.x <= nxt.z) {
            axis = 0u;
        } else if (nxt.y <= nxt.z) {
            axis = 1u;
        }
        let end = min(nxt[axis], amax);
        if (end > cur) {
            acc += voxel(idx) * (end - cur);
            cur = end;
        }
        if (nxt[axis] >= amax) {
            break;
        }
        idx[axis] += stp[axis];
        if (idx[axis] < 0 || idx[axis] >= n[axis]) {
            break;
        }
        nxt[axis] = (f32(idx[axis]) + 0.5 * f32(stp[axis]) - s[axis]) * inv[axis];
    }
    image[ray.out_index] = acc * ray.length_mm;
}
