#!/usr/bin/env python3
"""Expected HD95 values from MONAI, for crates/metrics/tests/monai_fixture.rs.

    .venv/bin/pip install monai torch==2.13.0
    .venv/bin/python bench/monai_hd95_fixture.py > crates/metrics/tests/fixtures/monai_hd95.json

Each case is a pair of binary masks (run-length coded, zeros first, C order
[z, y, x] or [y, x]) with a voxel spacing, and
monai.metrics.compute_hausdorff_distance(percentile=95, directed=False,
include_background=False) on their one-hot form. Run once; the JSON is
committed, so the tests need no Python.
"""
import json
import sys

import monai
import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage


def ellipsoid(shape, centre, radii):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def blobs(shape, seed, smooth, level):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), smooth) > level


def rle(mask):
    flat = mask.astype(np.uint8).ravel()
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    return runs


def monai_hd95(pred, truth, spacing):
    def onehot(m):
        t = torch.from_numpy(m.astype(np.float32))[None]
        return torch.stack([1 - t, t], dim=1)

    return float(compute_hausdorff_distance(onehot(pred), onehot(truth), include_background=False, percentile=95, directed=False, spacing=list(spacing))[0, 0])


def cases():
    s3 = (10, 24, 20)
    a = ellipsoid(s3, (4.5, 11, 9), (3.5, 8, 6))
    b = ellipsoid(s3, (5.0, 12.5, 10), (3.0, 7, 7))
    yield "overlapping ellipsoids", a, b, (2.5, 0.8, 0.7)
    fp = a.copy()
    fp[7:9, 20:23, 16:19] = True
    fp[2:4, 8:12, 6:9] = False
    yield "missed part and a far false positive", fp, a, (2.5, 0.8, 0.7)
    yield "random blobs 3D", blobs(s3, 1, 2.0, 0.05), blobs(s3, 2, 2.0, 0.0), (1.5, 1.0, 1.0)
    one = np.zeros(s3, bool)
    one[4] = a[4]
    yield "one slice against a volume", one, a, (3.0, 0.9, 0.9)
    s2 = (40, 48)
    yield "random blobs 2D", blobs(s2, 3, 3.0, 0.0), blobs(s2, 4, 3.0, 0.1), (0.9, 1.1)
    yield "touching the border", ellipsoid(s2, (2, 24), (8, 12)), ellipsoid(s2, (5, 26), (9, 10)), (1.0, 1.0)


def main():
    out = {"monai": monai.__version__, "cases": []}
    for name, pred, truth, spacing in cases():
        out["cases"].append({"name": name, "shape": list(pred.shape), "spacing": list(spacing), "pred": rle(pred), "truth": rle(truth), "hd95": monai_hd95(pred, truth, spacing)})
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


main()
