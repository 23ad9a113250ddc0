#!/usr/bin/env python3
"""How much of the landmark-only TRE is the apparent size of the detected pelvis.

Single-view registration reads the pelvis' depth (its distance from the source) from how large the
landmark constellation looks: a constellation detected 1% too small puts the pelvis about 1% of
its ~800 mm depth too far away, whatever the other errors. This reads an `eval --per-image` file
and its dataset's labels and, per image, fits the scale `s` that maps the true landmarks (about
their centroid) onto the detected ones (least squares over the landmarks inside the image), then
reports |s - 1|, the depth error it implies (|s - 1| x the true depth), and how it tracks the TRE.

    python3 tools/scale_error.py DATASET/labels.jsonl EVAL.jsonl

Standard library only. The points of both files are in model-input pixels (the dataset's size).
"""
import json
import math
import statistics as st
import sys


def main(labels_path, eval_path):
    labels = {}
    with open(labels_path) as f:
        for line in f:
            r = json.loads(line)
            labels[r["image"]] = r
    with open(labels_path.rsplit("/", 1)[0] + "/manifest.json") as f:
        size = json.load(f)["size"]
    scale_err, tre, depth_err = [], [], []
    with open(eval_path) as f:
        for line in f:
            r = json.loads(line)
            lab = labels.get(r["image"])
            if lab is None or r.get("tre_mm") is None or not r.get("points"):
                continue
            truth, det = lab["landmarks"], [p[:2] for p in r["points"]]
            inside = [
                i
                for i, t in enumerate(truth)
                if t is not None and 0 <= t[0] < size and 0 <= t[1] < size and i < len(det)
            ]
            if len(inside) < 6:
                continue
            ct = [st.mean(truth[i][k] for i in inside) for k in (0, 1)]
            cd = [st.mean(det[i][k] for i in inside) for k in (0, 1)]
            num = sum(
                (det[i][0] - cd[0]) * (truth[i][0] - ct[0]) + (det[i][1] - cd[1]) * (truth[i][1] - ct[1])
                for i in inside
            )
            den = sum((truth[i][0] - ct[0]) ** 2 + (truth[i][1] - ct[1]) ** 2 for i in inside)
            s = num / den
            scale_err.append(abs(s - 1))
            tre.append(r["tre_mm"])
            depth_err.append(abs(s - 1) * lab["pose"][5])
    if len(tre) < 3:
        sys.exit("fewer than 3 images with 6+ landmarks inside and a solved pose")
    mx, my = st.mean(scale_err), st.mean(tre)
    corr = sum((a - mx) * (b - my) for a, b in zip(scale_err, tre)) / math.sqrt(
        sum((a - mx) ** 2 for a in scale_err) * sum((b - my) ** 2 for b in tre)
    )
    small = [t for a, t in zip(scale_err, tre) if a < 0.005]
    print(f"{len(tre)} images (6+ landmarks inside, pose solved)")
    print(f"apparent scale error |s-1|: mean {100 * mx:.2f}%, median {100 * st.median(scale_err):.2f}%")
    print(f"depth error it implies: mean {st.mean(depth_err):.1f} mm; TRE mean {my:.1f} mm, median {st.median(tre):.1f} mm")
    print(f"correlation of |s-1| with TRE: {corr:.2f}")
    if small:
        print(
            f"images with |s-1| < 0.5%: {len(small)}, TRE mean {st.mean(small):.1f} mm, "
            f"median {st.median(small):.1f} mm"
        )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
