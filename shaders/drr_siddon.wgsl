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
    // Only the box of non-zero voxels (as the CPU reference): outside it everything adds zero.
    let range = clip_to_box(s, d, select(0.0, -3.0e38, full), select(1.0, 3.0e38, full), u.box_lo.xyz, u.box_hi.xyz);
    let amin = range.x;
    let amax = range.y;
    if (amin >= amax) {
        image[ray.out_index] = 0.0;
        return;
    }
    // Scalars per axis rather than vec3 components indexed by a variable: dynamic vector
    // indexing is slow on some drivers (lavapipe spills it to memory).
    let a_in = amin + 1e-6 * (amax - amin);
    let p = s + d * a_in;
    // Index limits of the box (inclusive).
    let lo = box_first();
    let hi = box_last();
    var ix = clamp(i32(floor(p.x + 0.5)), lo.x, hi.x);
    var iy = clamp(i32(floor(p.y + 0.5)), lo.y, hi.y);
    var iz = clamp(i32(floor(p.z + 0.5)), lo.z, hi.z);
    let sx = select(-1, 1, d.x > 0.0);
    let sy = select(-1, 1, d.y > 0.0);
    let sz = select(-1, 1, d.z > 0.0);
    let movx = abs(d.x) >= 1e-12;
    let movy = abs(d.y) >= 1e-12;
    let movz = abs(d.z) >= 1e-12;
    let invx = select(0.0, 1.0 / d.x, movx);
    let invy = select(0.0, 1.0 / d.y, movy);
    let invz = select(0.0, 1.0 / d.z, movz);
    // Next plane crossing on each axis, from the voxel index (no accumulated rounding).
    var nx = select(3.0e38, (f32(ix) + 0.5 * f32(sx) - s.x) * invx, movx);
    var ny = select(3.0e38, (f32(iy) + 0.5 * f32(sy) - s.y) * invy, movy);
    var nz = select(3.0e38, (f32(iz) + 0.5 * f32(sz) - s.z) * invz, movz);
    var acc = 0.0;
    var cur = amin;
    let max_steps = u.dims.x + u.dims.y + u.dims.z + 3u;
    // Branch-free stepping: neighbouring rays cross planes of different axes, and SIMD
    // implementations (lavapipe runs 8 rays per vector) would otherwise run every branch.
    // In the buffer, the voxel's linear index moves by a fixed stride per axis: one add per
    // step instead of the index arithmetic of `voxel`.
    let nb = hi - lo + vec3<i32>(1);
    var lin = (ix - lo.x) + nb.x * ((iy - lo.y) + nb.y * (iz - lo.z));
    let dlx = sx;
    let dly = sy * nb.x;
    let dlz = sz * nb.x * nb.y;
    // Planes left to cross on each axis before the ray leaves the box.
    var rx = select(ix - lo.x, hi.x - ix, sx > 0);
    var ry = select(iy - lo.y, hi.y - iy, sy > 0);
    var rz = select(iz - lo.z, hi.z - iz, sz > 0);
    for (var it = 0u; it < max_steps; it++) {
        let next = min(nx, min(ny, nz));
        let end = min(next, amax);
        var v: f32;
        if (VOLUME_IN_BUFFER) {
            v = density_buf[u32(lin)];
        } else {
            v = voxel(vec3<i32>(ix, iy, iz));
        }
        acc += v * max(end - cur, 0.0);
        cur = max(cur, end);
        let tx = nx <= ny && nx <= nz;
        let ty = !tx && ny <= nz;
        let tz = !tx && !ty;
        ix += select(0, sx, tx);
        iy += select(0, sy, ty);
        iz += select(0, sz, tz);
        lin += select(select(dlz, dly, ty), dlx, tx);
        rx -= select(0, 1, tx);
        ry -= select(0, 1, ty);
        rz -= select(0, 1, tz);
        nx = select(nx, (f32(ix) + 0.5 * f32(sx) - s.x) * invx, tx);
        ny = select(ny, (f32(iy) + 0.5 * f32(sy) - s.y) * invy, ty);
        nz = select(nz, (f32(iz) + 0.5 * f32(sz) - s.z) * invz, tz);
        if (next >= amax || min(rx, min(ry, rz)) < 0) {
            break;
        }
    }
    image[ray.out_index] = acc * ray.length_mm;
}
