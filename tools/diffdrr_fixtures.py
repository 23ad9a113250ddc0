"""Reference numbers from DiffDRR 0.6.1 itself, for fluoropose's parity tests.

Run with a Python that has `diffdrr==0.6.1` (and torch) installed:
    OMP_NUM_THREADS=1 python tools/diffdrr_fixtures.py [--drr]
Writes tests/data/diffdrr/projection.json (always) and, with --drr, DRR images
tests/data/diffdrr/drr_*.npy with drr_cases.json. The project's tests never need Python.
"""
import json, sys, os
from pathlib import Path
import numpy as np
import torch
from diffdrr.data import read
from diffdrr.drr import DRR
from diffdrr.pose import convert

torch.set_num_threads(1)
root = Path(__file__).resolve().parents[1]
out = root / "tests" / "data" / "diffdrr"
out.mkdir(parents=True, exist_ok=True)
import diffdrr
ct = Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz"
subject = read(str(ct))  # orientation="AP", center_volume=True

def pose(rot, trans):
    return convert(torch.tensor([rot], dtype=torch.float64).float(), torch.tensor([trans], dtype=torch.float64).float(),
                   parameterization="euler_angles", convention="ZXY")

affine = torch.as_tensor(subject.volume.affine, dtype=torch.float64)
voxels = [[0, 0, 0], [511, 511, 132], [256, 256, 66], [100, 400, 20], [400, 120, 110], [300, 50, 90], [60, 300, 10], [450, 450, 60]]

def world(v):
    h = torch.tensor([v[0], v[1], v[2], 1.0], dtype=torch.float64)
    return (affine @ h)[:3].tolist()

cases = []
specs = [
    dict(height=200, width=None, delx=2.0, dely=None, rot=[0, 0, 0], trans=[0, 850, 0]),
    dict(height=256, width=None, delx=2.0, dely=None, rot=[0.3, -0.2, 0.5], trans=[20, 830, -40]),
    dict(height=256, width=None, delx=2.0, dely=None, rot=[-0.785, 0.785, -0.4], trans=[-50, 900, 50]),
    dict(height=200, width=300, delx=1.5, dely=2.5, rot=[0.6, 0.1, -0.7], trans=[10, 800, 30]),
    dict(height=128, width=None, delx=4.0, dely=None, rot=[0.0, 0.785, 0.0], trans=[0, 850, 0]),
    dict(height=256, width=200, delx=2.0, dely=2.0, rot=[-0.3, -0.6, 0.785], trans=[45, 870, -10]),
]
for s in specs:
    drr = DRR(subject, sdd=1020.0, height=s["height"], delx=s["delx"], width=s["width"], dely=s["dely"])
    p = pose(s["rot"], s["trans"])
    pts = torch.tensor([[world(v) for v in voxels]], dtype=torch.float32)
    uv = drr.perspective_projection(p, pts)[0].tolist()
    cases.append({
        "ct": "cxr.nii.gz", "sdd": 1020.0, "height": s["height"], "width": s["width"] or s["height"],
        "delx": s["delx"], "dely": s["dely"] or s["delx"], "rotations_zxy_rad": s["rot"], "translations_mm": s["trans"],
        "voxels": voxels, "world_mm": [world(v) for v in voxels], "uv": uv,
    })
(out / "projection.json").write_text(json.dumps({"diffdrr": diffdrr.__version__ if hasattr(diffdrr, "__version__") else "0.6.1", "cases": cases}, indent=1))
print("projection.json:", len(cases), "cases")

if "--drr" in sys.argv:
    poses = [([0, 0, 0], [0, 850, 0]), ([0.785, -0.3, 0.2], [40, 820, -30]), ([-0.5, 0.785, -0.3], [-50, 880, 45]), ([0.2, 0.4, -0.785], [25, 850, 50])]
    meta = []
    for renderer in ["siddon", "trilinear"]:
        for height, delx in [(128, 4.0), (256, 2.0)]:
            drr = DRR(subject, sdd=1020.0, height=height, delx=delx, renderer=renderer)
            for k, (rot, trans) in enumerate(poses):
                with torch.no_grad():
                    img = drr(torch.tensor([rot]), torch.tensor([trans], dtype=torch.float32), parameterization="euler_angles", convention="ZXY")
                a = img[0, 0].numpy().astype(np.float32)
                name = f"drr_{renderer}_{height}_{k}.npy"
                np.save(out / name, a)
                meta.append({"file": name, "renderer": renderer, "height": height, "width": height, "delx": delx, "dely": delx, "sdd": 1020.0,
                             "rotations_zxy_rad": rot, "translations_mm": trans, "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean())})
                print(name, a.min(), a.max(), flush=True)
    (out / "drr_cases.json").write_text(json.dumps({"trilinear_n_points": 500, "cases": meta}, indent=1))
