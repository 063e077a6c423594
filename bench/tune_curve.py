"""Summarise `bench/run.sh tune`: best validation Dice so far against trial
number, per strategy, over the seeds; and what pruning saved (seed 0 run with
and without the median pruner, same strategies and budget)."""
import glob
import os
import sys

import pyarrow.parquet as pq


def trials(run_dir):
    paths = glob.glob(os.path.join(run_dir, "artifacts", "tune", "*", "trials.parquet"))
    paths = [p for p in paths if os.path.exists(p)]
    if len(paths) != 1:
        sys.exit(f"{run_dir}: expected one tune artifact, found {len(paths)}")
    return pq.read_table(paths[0]).to_pylist()


def best_so_far(rows, strategy):
    out, best = [], float("-inf")
    for r in sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["trial"]):
        best = max(best, r["objective"])
        out.append(best)
    return out


root = sys.argv[1]
seeds = sorted(d for d in os.listdir(root) if d.endswith("-median"))
strategies = [s for s in ("random", "bayes", "gp") if any(r["strategy"] == s for r in trials(os.path.join(root, seeds[0])))]
curves = {s: [best_so_far(trials(os.path.join(root, d)), s) for d in seeds] for s in strategies}
n = min(len(c) for cs in curves.values() for c in cs)
print(f"best validation Dice so far, mean over {len(seeds)} seeds ({', '.join(seeds)})")
print("trial  " + "  ".join(f"{s:>8}" for s in curves) + f"   per seed ({' | '.join(curves)})")
for i in range(n):
    means = [sum(c[i] for c in cs) / len(cs) for cs in curves.values()]
    per = " | ".join(" ".join(f"{c[i]:.3f}" for c in cs) for cs in curves.values())
    print(f"{i + 1:>5}  " + "  ".join(f"{m:8.4f}" for m in means) + f"   {per}")

# Where each strategy spends its trials once TPE's random startup (3) is over.
print("trials 4 and later: median objective, pruned / run, per seed")
for s in curves:
    per = []
    for d in seeds:
        rows = [r for r in trials(os.path.join(root, d)) if r["strategy"] == s and r["trial"] >= 3]
        objs = sorted(r["objective"] for r in rows)
        med = (objs[(len(objs) - 1) // 2] + objs[len(objs) // 2]) / 2
        per.append(f"{med:.3f} ({sum(r['pruned'] for r in rows)}/{len(rows)} pruned)")
    print(f"  {s:>6}: " + ", ".join(per))

if not os.path.isdir(os.path.join(root, "seed0-none")):
    sys.exit(0)
with_p, without = trials(os.path.join(root, "seed0-median")), trials(os.path.join(root, "seed0-none"))
for name, rows in (("median pruning", with_p), ("no pruning", without)):
    secs = sum(r["seconds"] for r in rows)
    epochs = sum(r["epochs_run"] for r in rows)
    pruned = sum(r["pruned"] for r in rows)
    best = max(r["objective"] for r in rows)
    print(f"seed 0, {name}: {len(rows)} trials, {pruned} pruned, {epochs} epochs, {secs:.0f} s of training, best Dice {best:.4f}")
sp = sum(r["seconds"] for r in with_p) / sum(r["seconds"] for r in without)
print(f"pruning: training time ratio {sp:.2f} (with / without)")
