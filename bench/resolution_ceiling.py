"""The Dice per case a perfect model could reach on the model's grid.

A model trained at normalise.size learns the nearest-resized masks; evaluate
resamples its probabilities bilinearly (align_corners=False) to each slice's
own grid and thresholds at 0.5. Feeding the training masks themselves through
that path gives the ceiling the input size alone sets.

    .venv/bin/python bench/resolution_ceiling.py target/bench/accuracy [SPLIT]
Reads the folder's store (ingest, normalise, split artifacts) and the source
masks (a slices2d source, checked against the stored masks); prints the
mean Dice per case of the split (default test) and of all patients.
"""
import glob, os, sys
import json
import numpy as np
import pyarrow.parquet as pq
from PIL import Image
import torch
from safetensors.numpy import load_file

folder, split = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "test")
art = lambda stage: glob.glob(os.path.join(folder, "artifacts", stage, "*"))
(ingest,), (normalise,), (split_dir,) = art("ingest"), art("normalise"), art("split")
slices = pq.read_table(os.path.join(ingest, "slices.parquet")).to_pylist()
index = pq.read_table(os.path.join(normalise, "index.parquet")).to_pylist()
assign = {r["case_id"]: r["split"] for r in pq.read_table(os.path.join(split_dir, "assignment.parquet")).to_pylist()}
small = load_file(os.path.join(normalise, "data.safetensors"))["masks"]
params = json.load(open(os.path.join(ingest, "manifest.json")))["params"]
root, mask_dir = params["data.root"], params["data.mask_dir"]

# Each case file holds its slices in slices.parquet's order.
position, seen = {}, {}
for r in slices:
    position[r["source_file"]] = seen.get(r["case_id"], 0)
    seen[r["case_id"]] = position[r["source_file"]] + 1
cases = {}
for r, m in zip(index, small):
    c = r["case_id"]
    if c not in cases:
        bits = load_file(os.path.join(ingest, "cases", f"{c}.safetensors"))["mask_bits"]
        cases[c] = (np.unpackbits(bits, axis=-1, bitorder="big").astype(bool), [0, 0, 0])
    truth_all, acc = cases[c]
    truth = truth_all[position[r["source_file"]]]
    # The stored truth is the source mask (liver > 127), up to a few pixels
    # near 127 where Pillow's JPEG decoder and liverseg's round differently.
    source = os.path.join(root, mask_dir, os.path.basename(r["source_file"]))
    differ = (truth != (np.asarray(Image.open(source).convert("L")) > 127)).sum()
    assert differ <= 8, f"{source}: {differ} pixels differ from the stored mask"
    up = torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], size=truth.shape,
                                         mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5
    acc[0] += (up & truth).sum(); acc[1] += truth.sum(); acc[2] += up.sum()
dice = {c: 2 * a[0] / (a[1] + a[2]) for c, (_, a) in cases.items()}
chosen = [d for c, d in dice.items() if assign[c] == split]
print(f"size {small.shape[1]}: ceiling Dice per case, {split} ({len(chosen)} cases) {np.mean(chosen):.4f} "
      f"(min {min(chosen):.4f}); all {len(dice)} cases {np.mean(list(dice.values())):.4f}")
