"""The accuracy benchmark's table from one evaluate artifact: per model, the
validation patients as exported and under the simulated other exports (the
numbers a recipe is chosen on), then the MSD test split and every external
source, each with Dice per case [95% CI] and pixel accuracy beside it (a
model that labels a third of the image as liver keeps a fair Dice on big
livers; pixel accuracy shows the collapse), and the inputs' intensity
distance from the training data. Arguments: EVALUATE_DIR RECIPE_LABEL."""
import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq


def fmt(v, digits=3):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def cell(r):
    lo, hi = r.get("dice_per_case_ci_low"), r.get("dice_per_case_ci_high")
    ci = f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and not math.isnan(lo) else f" (n = {r['cases']})"
    return f"{fmt(r['dice_per_case'])}{ci}, PA {fmt(r['pixel_accuracy'])}"


ev, recipe = Path(sys.argv[1]), sys.argv[2]
metrics = json.loads((ev / "manifest.json").read_text())["metrics"]
sources = [("MSD test", ev / "table1.parquet")] + [(n, ev / "external" / n / "table1.parquet") for n in metrics.get("external", [])]
tables = {name: {r["model"]: r for r in pq.read_table(path).to_pylist()} for name, path in sources}
print(f"| recipe | model | post-processing | MSD val | simulated-shift val | " + " | ".join(f"{n} Dice per case [95% CI], PA" for n, _ in sources) + " | intensity distance |")
print("|---" * (5 + len(sources) + 1) + "|")
for model, row in tables["MSD test"].items():
    val, shift = metrics.get(f"val.{model}.dice_per_case"), metrics.get(f"val_shift.{model}.dice_per_case")
    cells = [cell(tables[n][model]) if model in tables[n] else "n/a" for n, _ in sources]
    dist = ", ".join(f"{n} {fmt(tables[n][model].get('intensity_distance'))}" for n, _ in sources if model in tables[n])
    print(f"| {recipe} | {model} | {row.get('postprocess', 'n/a')} | {fmt(val)} | {fmt(shift)} | " + " | ".join(cells) + f" | {dist} |")
