"""Reference numbers from DiffDRR 0.6.1 itself, for fluoropose's parity tests.

Run with the Python that has `diffdrr==0.6.1` (and torch) installed, e.g.
    python3 -m venv /opt/diffdrr-venv && /opt/diffdrr-venv/bin/pip install diffdrr==0.6.1
    OMP_NUM_THREADS=1 /opt/diffdrr-venv/bin/python tools/diffdrr_fixtures.py [--drr]
Writes tests/data/diffdrr/projection.json (always) and, with --drr, DRR images
tests/data/diffdrr/drr_*.npy with drr_cases.json. The project's tests never need Python.

Before writing anything it checks, against DiffDRR itself, the conventions written down in
docs/diffdrr-notes.md (world frame, detector pixel positions, projection half-pixel offsets,
Siddon and trilinear line integrals, image orientation); an AssertionError means the notes
are wrong for this DiffDRR.
"""
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch

import diffdrr
from diffdrr.data import read, transform_hu_to_density
from diffdrr.drr import DRR
from diffdrr.pose import convert
from diffdrr.renderers import Siddon, Trilinear, _get_alpha_minmax

torch.set_num_threads(1)
root = Path(__file__).resolve().parents[1]
out = root / "tests" / "data" / "diffdrr"
out.mkdir(parents=True, exist_ok=True)
ct = Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz"
# Same volume, affine and density as diffdrr.data.load_example_ct() (which also loads the mask).
subject = read(str(ct))  # orientation="AP", center_volume=True
VERSION = getattr(diffdrr, "__version__", "0.6.1")

SDD = 1020.0
AFFINE = np.asarray(subject.volume.affine, dtype=np.float64)  # RAS+, centred; what DRR uses (as float32)
DENSITY = subject.density.data.squeeze().numpy().astype(np.float64)  # indexed [i, j, k]
DIMS = np.array(DENSITY.shape)
REORIENT_AP = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=np.float64)


def pose(rot, trans):
    return convert(torch.tensor([rot], dtype=torch.float32), torch.tensor([trans], dtype=torch.float32),
                   parameterization="euler_angles", convention="ZXY")


def world(v):
    """World (DiffDRR) coordinates of voxel centre (i, j, k): the centred RAS affine, no voxel_shift."""
    return (AFFINE @ np.array([v[0], v[1], v[2], 1.0]))[:3].tolist()


# ---------------------------------------------------------------- self-checks of the notes
def rz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def rx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def cam_to_world(rot, trans):
    """(R3, t3) with world = R3 @ p_cam + t3: E(pose) @ REORIENT, E = [R | R t], R = Rz Rx Ry."""
    R = rz(rot[0]) @ rx(rot[1]) @ ry(rot[2])
    return R @ REORIENT_AP, R @ np.asarray(trans, dtype=np.float64)


def pixel_cam(H, W, delx, dely, x0=0.0, y0=0.0):
    """Camera-frame centres of all pixels, row-major (row r = index // W), reverse_x_axis=True."""
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    x = x0 + delx * (W / 2 - 0.5 - c)
    y = y0 + dely * (H / 2 - 0.5 - r)
    return np.stack([x, y, np.full_like(x, SDD, dtype=np.float64)], -1).reshape(-1, 3)


def to_voxel(p):
    return (np.linalg.inv(AFFINE) @ np.c_[p, np.ones(len(p))].T).T[:, :3]


def siddon_ray(s_w, t_w):
    """Our reading of renderers.Siddon: every plane i-0.5 (i=0..N) of every axis, sorted alphas,
    nearest voxel at each midpoint (zero outside), times alpha step, times ray length in mm."""
    s, t = to_voxel(np.stack([s_w, t_w]))
    al = np.concatenate([(np.arange(DIMS[a] + 1) - 0.5 - s[a]) / (t[a] - s[a]) for a in range(3)])
    al = np.sort(al)
    mid = (al[:-1] + al[1:]) / 2
    p = s[None] + mid[:, None] * (t - s)[None]
    idx = np.rint(p).astype(int)
    ok = np.all((idx >= 0) & (idx < DIMS[None]), axis=1)
    vals = np.zeros(len(mid))
    vals[ok] = DENSITY[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
    return float(np.sum(vals * np.diff(al)) * np.linalg.norm(t_w - s_w))


def trilinear_at(p):
    """grid_sample(mode='bilinear', align_corners=False, padding zeros) at voxel coordinates p."""
    f = np.floor(p).astype(int)
    w = p - f
    acc = np.zeros(len(p))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                q = f + np.array([dx, dy, dz])
                wt = (w[:, 0] if dx else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1]) * (w[:, 2] if dz else 1 - w[:, 2])
                ok = np.all((q >= 0) & (q < DIMS[None]), axis=1)
                v = np.zeros(len(p))
                v[ok] = DENSITY[q[ok, 0], q[ok, 1], q[ok, 2]]
                acc += wt * v
    return acc


def alpha_range(S, T):
    """Our reading of renderers._get_alpha_minmax: box [-0.5, N+0.5] (sic, one voxel past the
    far faces), per ray entry = max over axes of min, exit = min over axes of max, clamped to
    [0, 1]; the renderer then takes the min entry and max exit over all rays of the batch."""
    d = T - S
    a0 = (-0.5 - S) / d
    a1 = (DIMS[None] + 0.5 - S) / d
    amin = np.clip(np.minimum(a0, a1).max(1), 0, None)
    amax = np.clip(np.maximum(a0, a1).min(1), None, 1)
    return amin.min(), amax.max()


def trilinear_ray(s_w, t_w, amin, amax, n_points=500):
    s, t = to_voxel(np.stack([s_w, t_w]))
    al = np.linspace(0, 1, n_points) * (amax - amin) + amin
    p = s[None] + al[:, None] * (t - s)[None]
    return float(trilinear_at(p).sum() * (amax - amin) / (n_points - 1) * np.linalg.norm(t_w - s_w))


def check_conventions():
    # density
    hu = subject.volume.data.to(torch.float32)
    soft_min = hu[(hu > -800) & (hu <= 350)].min()
    d = torch.where(hu <= -800, soft_min, hu)
    d = (d - d.min()) / (d - d.min()).max()
    assert torch.allclose(d, subject.density.data, atol=1e-6)
    assert torch.allclose(transform_hu_to_density(subject.volume.data, 1.0), subject.density.data)
    # centring: voxel (N-1)/2 is the world origin
    assert np.allclose(world((DIMS - 1) / 2), 0, atol=1e-9)
    for H, W, delx, dely, x0, y0, rot, trans in [
        (6, 4, 2.0, 3.0, 0.0, 0.0, [0, 0, 0], [0, 850, 0]),
        (5, 7, 1.5, 2.5, 7.0, -3.0, [0.3, -0.2, 0.5], [20, 830, -40]),
    ]:
        drr = DRR(subject, sdd=SDD, height=H, width=W, delx=delx, dely=dely, x0=x0, y0=y0)
        p = pose(rot, trans)
        src, tgt = drr.detector(p, None)
        R3, t3 = cam_to_world(rot, trans)
        mine = pixel_cam(H, W, delx, dely, x0, y0) @ R3.T + t3
        assert np.allclose(tgt[0].double().numpy(), mine, atol=1e-3), "pixel centre positions"
        assert np.allclose(src[0, 0].double().numpy(), t3, atol=1e-3), "source = R t"
        uv = drr.perspective_projection(p, tgt.clone())[0].double().numpy()
        r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        want = np.stack([c + 0.5, r + 0.5], -1).reshape(-1, 2)
        assert np.allclose(uv, want, atol=2e-3), "pixel (r, c) centre projects to (u, v) = (c + .5, r + .5)"
    # renderers, pixel by pixel, on a small detector (also pins img[0, 0, row, col] orientation)
    H, W, delx = 16, 12, 24.0
    for rot, trans in [([0, 0, 0], [0, 850, 0]), ([0.4, -0.3, 0.2], [30, 820, -20])]:
        R3, t3 = cam_to_world(rot, trans)
        tw = pixel_cam(H, W, delx, delx) @ R3.T + t3
        for name in ["siddon", "trilinear"]:
            drr = DRR(subject, sdd=SDD, height=H, width=W, delx=delx, renderer=name)
            with torch.no_grad():
                img = drr(torch.tensor([rot], dtype=torch.float32), torch.tensor([trans], dtype=torch.float32),
                          parameterization="euler_angles", convention="ZXY")[0, 0].double().numpy()
            if name == "trilinear":
                amin, amax = alpha_range(to_voxel(t3[None]).repeat(len(tw), 0), to_voxel(tw))
            for (r, c) in [(0, 0), (0, W - 1), (H - 1, 0), (H // 2, W // 2), (3, 7), (11, 2)]:
                k = r * W + c
                ref = siddon_ray(t3, tw[k]) if name == "siddon" else trilinear_ray(t3, tw[k], amin, amax)
                assert abs(img[r, c] - ref) <= 2e-4 * max(1.0, abs(ref)), (name, r, c, img[r, c], ref)
    print("conventions of docs/diffdrr-notes.md hold for this DiffDRR")


check_conventions()

# ---------------------------------------------------------------- projection.json
voxels = [[0, 0, 0], [511, 511, 132], [256, 256, 66], [100, 400, 20], [400, 120, 110], [300, 50, 90], [60, 300, 10], [450, 450, 60]]
specs = [
    dict(height=200, width=None, delx=2.0, dely=None, rot=[0, 0, 0], trans=[0, 850, 0]),
    dict(height=256, width=None, delx=2.0, dely=None, rot=[0.3, -0.2, 0.5], trans=[20, 830, -40]),
    dict(height=256, width=None, delx=2.0, dely=None, rot=[-0.785, 0.785, -0.4], trans=[-50, 900, 50]),
    dict(height=200, width=300, delx=1.5, dely=2.5, rot=[0.6, 0.1, -0.7], trans=[10, 800, 30]),
    dict(height=128, width=None, delx=4.0, dely=None, rot=[0.0, 0.785, 0.0], trans=[0, 850, 0]),
    dict(height=256, width=200, delx=2.0, dely=2.0, rot=[-0.3, -0.6, 0.785], trans=[45, 870, -10]),
]
cases = []
for s in specs:
    drr = DRR(subject, sdd=SDD, height=s["height"], delx=s["delx"], width=s["width"], dely=s["dely"])
    p = pose(s["rot"], s["trans"])
    w = [world(v) for v in voxels]
    # DRR's own (float32) affine gives the same world points
    assert np.allclose(drr.affine(torch.tensor([voxels], dtype=torch.float32))[0].numpy(), w, atol=1e-3)
    uv = drr.perspective_projection(p, torch.tensor([w], dtype=torch.float32))[0].tolist()
    cases.append({
        "ct": "cxr.nii.gz", "sdd": SDD, "height": s["height"], "width": s["width"] or s["height"],
        "delx": s["delx"], "dely": s["dely"] or s["delx"], "rotations_zxy_rad": s["rot"], "translations_mm": s["trans"],
        "voxels": voxels, "world_mm": w, "uv": uv,
    })
(out / "projection.json").write_text(json.dumps({
    "diffdrr": VERSION, "torch": torch.__version__,
    "world": "world_mm = centred RAS+ affine of read(cxr.nii.gz) (torchio/SimpleITK) applied to the 0-based voxel index "
             "(voxel centre; voxel_shift plays no part); uv = DRR.perspective_projection: (column, row) with pixel "
             "(r, c) centred at (c + 0.5, r + 0.5); x0 = y0 = 0, reverse_x_axis = True, orientation AP",
    "cases": cases}, indent=1))
print("projection.json:", len(cases), "cases")


# ---------------------------------------------------------------- DRRs
def defaults(cls, fn="__init__"):
    sig = inspect.signature(getattr(cls, fn))
    return {k: v.default for k, v in sig.parameters.items()
            if v.default is not inspect.Parameter.empty and k not in ("mask", "alphamin", "alphamax")}


def render(drr, rot, trans):
    with torch.no_grad():
        img = drr(torch.tensor([rot], dtype=torch.float32), torch.tensor([trans], dtype=torch.float32),
                  parameterization="euler_angles", convention="ZXY")
    return img[0, 0].numpy().astype(np.float32)


def alpha_minmax(drr, rot, trans):
    """The global alphamin/alphamax DiffDRR's Trilinear uses for this image (its own code)."""
    with torch.no_grad():
        src, tgt = drr.detector(pose(rot, trans), None)
        s, t = drr.affine_inverse(src), drr.affine_inverse(tgt)
        dims = torch.tensor(drr.density.shape).to(drr.density)
        amin, amax = _get_alpha_minmax(s, t, dims, drr.renderer.voxel_shift, drr.renderer.eps)
    return float(amin.min()), float(amax.max())


def entry(name, renderer, H, W, delx, dely, rot, trans, a, drr):
    e = {"file": name, "renderer": renderer, "height": H, "width": W, "delx": delx, "dely": dely, "sdd": SDD,
         "rotations_zxy_rad": rot, "translations_mm": trans,
         "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())}
    if renderer == "trilinear":
        e["alphamin"], e["alphamax"] = alpha_minmax(drr, rot, trans)
    return e


if "--drr" in sys.argv:
    poses = [([0, 0, 0], [0, 850, 0]), ([0.785, -0.3, 0.2], [40, 820, -30]),
             ([-0.5, 0.785, -0.3], [-50, 880, 45]), ([0.2, 0.4, -0.785], [25, 850, 50])]
    meta = []
    for renderer in ["siddon", "trilinear"]:
        for height, delx in [(128, 4.0), (256, 2.0)]:
            drr = DRR(subject, sdd=SDD, height=height, delx=delx, renderer=renderer)
            for k, (rot, trans) in enumerate(poses):
                a = render(drr, rot, trans)
                name = f"drr_{renderer}_{height}_{k}.npy"
                np.save(out / name, a)
                meta.append(entry(name, renderer, height, height, delx, delx, rot, trans, a, drr))
                print(name, a.min(), a.max(), a.mean(), flush=True)
    # Non-square detector with delx != dely (kept apart: older readers assume square images).
    nonsquare = []
    H, W, delx, dely = 96, 128, 3.0, 4.0
    for renderer in ["siddon", "trilinear"]:
        drr = DRR(subject, sdd=SDD, height=H, width=W, delx=delx, dely=dely, renderer=renderer)
        rot, trans = poses[1]
        a = render(drr, rot, trans)
        name = f"drr_{renderer}_{H}x{W}_1.npy"
        np.save(out / name, a)
        nonsquare.append(entry(name, renderer, H, W, delx, dely, rot, trans, a, drr))
        print(name, a.shape, a.min(), a.max(), a.mean(), flush=True)
    tri = defaults(Trilinear)
    tri.update(defaults(Trilinear, "forward"))
    sid = defaults(Siddon)
    sid.update(defaults(Siddon, "forward"))
    (out / "drr_cases.json").write_text(json.dumps({
        "diffdrr": VERSION, "torch": torch.__version__,
        "trilinear_n_points": tri["n_points"],
        "trilinear_defaults": tri,
        "trilinear_step": "alphas = linspace(0, 1, n_points) * (alphamax - alphamin) + alphamin, alphamin = min over all "
                          "rays of the entry into the box [-0.5, N + 0.5] (voxel index units; clamped to [0, 1]), alphamax "
                          "= max of the exits; pixel = |target - source|_mm * (alphamax - alphamin) / (n_points - 1) * "
                          "sum of trilinear samples (zero outside the volume); per-image alphamin/alphamax recorded",
        "siddon_defaults": sid,
        "drr_defaults": {k: v for k, v in defaults(DRR).items() if k != "renderer_kwargs"},
        "cases": meta,
        "nonsquare_cases": nonsquare,
    }, indent=1))
