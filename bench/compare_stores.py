#!/usr/bin/env python3
"""Run one pipeline with two builds of liverseg and compare what they stored.

    python3 bench/compare_stores.py OLD_BIN_DIR NEW_BIN_DIR PIPELINE.yaml WORK \
        [--stages ingest,normalise,split,augment,evaluate] [--target STAGE] [-P key=value ...]

Each side runs in WORK/old or WORK/new (the pipeline file copied there, a
relative data.root made absolute so both read the same files). Every stage's
key must be equal on both sides (`status --json`), and for the stages named by
--stages every output file must have the same blake3 (the manifests record
them; `verify` checks the files against the manifests). Exits 1 on any
difference, naming it. Used to show that a refactoring changes no artifact.
"""
import argparse, json, os, re, shutil, subprocess, sys

def side(bin_dir, pipeline, work, target, sets):
    os.makedirs(work, exist_ok=True)
    text = open(pipeline).read()
    base = os.path.dirname(os.path.abspath(pipeline))
    # data.root relative to the pipeline file -> absolute, in both `root:` and `data.root:` forms.
    def absolute(m):
        path = m.group(2)
        return m.group(1) + (path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path)))
    text = re.sub(r"^(\s*(?:data\.)?root:\s*)(\S+)\s*$", absolute, text, flags=re.M)
    open(os.path.join(work, "pipeline.yaml"), "w").write(text)
    binary = os.path.join(bin_dir, "liverseg")
    args = [a for kv in sets for a in ("-P", kv)]
    run = [binary, "run", "-q"] + ([target] if target else []) + args
    subprocess.run(run, cwd=work, check=True)
    st = subprocess.run([binary, "status", "--json"] + args, cwd=work, check=True, capture_output=True, text=True)
    subprocess.run([binary, "verify"], cwd=work, check=True, capture_output=True)
    doc = json.loads(st.stdout)
    # `status --json` is {"stages": [...], "slurm_jobs": [...]} (a list before).
    stages = doc["stages"] if isinstance(doc, dict) else doc
    return {s["stage"]: s for s in stages}

def outputs(work, stage, key):
    m = json.load(open(os.path.join(work, "artifacts", stage, key, "manifest.json")))
    return {name: f["blake3"] for name, f in m["outputs"].items()}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old"); ap.add_argument("new"); ap.add_argument("pipeline"); ap.add_argument("work")
    ap.add_argument("--stages", default="ingest,normalise,split,augment,evaluate")
    ap.add_argument("--target")
    ap.add_argument("-P", dest="sets", action="append", default=[])
    ap.add_argument("--keep-old", action="store_true", help="reuse WORK/old from an earlier run with the same arguments")
    a = ap.parse_args()
    marker = os.path.join(a.work, "old", ".complete")
    if not (a.keep_old and os.path.exists(marker)):
        shutil.rmtree(a.work, ignore_errors=True)
    shutil.rmtree(os.path.join(a.work, "new"), ignore_errors=True)
    old = side(a.old, a.pipeline, os.path.join(a.work, "old"), a.target, a.sets)
    open(marker, "w").write("done\n")
    new = side(a.new, a.pipeline, os.path.join(a.work, "new"), a.target, a.sets)
    problems = []
    if sorted(old) != sorted(new):
        problems.append(f"stages differ: {sorted(old)} vs {sorted(new)}")
    for name in sorted(set(old) & set(new)):
        if old[name]["key"] != new[name]["key"]:
            problems.append(f"{name}: key {old[name]['key']} vs {new[name]['key']}")
    compared = 0
    for name in sorted(set(old) & set(new)):
        if name.split(".")[0] not in a.stages.split(",") or old[name]["state"] != "fresh":
            continue
        o, n = outputs(os.path.join(a.work, "old"), name, old[name]["key"]), outputs(os.path.join(a.work, "new"), name, new[name]["key"])
        for f in sorted(set(o) | set(n)):
            if o.get(f) != n.get(f):
                problems.append(f"{name}/{f}: blake3 {o.get(f)} vs {n.get(f)}")
        compared += len(o)
    for p in problems:
        print("DIFFERENT", p)
    print(f"{len(old)} stage keys compared, {compared} output files compared: {'identical' if not problems else str(len(problems)) + ' difference(s)'}")
    sys.exit(1 if problems else 0)

main()
