//! The engine on its own, with toy stages: caching by content, partial
//! reruns, raw files, instances (datasets, `uses:`, `foreach:`), declared
//! outputs, sub-artifacts with gc and verify, and config errors. No liver
//! stage is involved.

use anyhow::{bail, Result};
use liverseg_engine::config;
use liverseg_engine::params::Params;
use liverseg_engine::runner::Engine;
use liverseg_engine::scan::RawSource;
use liverseg_engine::stage::{Placement, Stage, StageContext, StageInfo, Summary};
use liverseg_engine::store::{Depth, Problem};
use std::path::{Path, PathBuf};

liverseg_engine::params! {
    struct LettersParams {
        root as "data.root": String = str "text", "folder of text files";
        label as "data.label": String = str "main", "a dataset's name";
    }
}

liverseg_engine::params! {
    struct UpperParams {
        times: usize = int "1", "repetitions";
    }
}

liverseg_engine::params! {
    struct NoParams {}
}

liverseg_engine::params! {
    struct SearchParams {
        tries: u64 = int "2", "sub-artifacts to make";
    }
}

/// Source: the files under data.root, concatenated in name order.
struct Letters;
static LETTERS: StageInfo = StageInfo {
    name: "letters",
    version: 1,
    about: "concatenate text files",
    inputs: &[],
    optional_inputs: &[],
    collects: &[],
    per_dataset: true,
    dataset_requires: &["root"],
    outputs: &["text.txt"],
    params: LettersParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Letters {
    fn info(&self) -> &'static StageInfo {
        &LETTERS
    }
    fn raw_inputs(&self, params: &Params, root: &Path) -> Result<Vec<RawSource>> {
        let p: LettersParams = params.typed()?;
        let dir = root.join(&p.root);
        Ok(vec![RawSource::Tree { base: dir.clone(), dir, list_folder_if: |_| false }])
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: LettersParams = ctx.params.typed()?;
        let mut text = format!("[{}]", p.label);
        for r in ctx.raw_files {
            text.push_str(&String::from_utf8(ctx.read_raw(&ctx.project_root.join(&p.root).join(&r.path))?)?);
        }
        std::fs::write(ctx.out("text.txt"), &text)?;
        Ok(Summary::from([("chars".to_owned(), text.len().into())]))
    }
}

/// Per dataset: the upstream text in capitals, `times` times.
struct Upper;
static UPPER: StageInfo = StageInfo {
    name: "upper",
    version: 1,
    about: "capitals",
    inputs: &["letters"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: true,
    dataset_requires: &[],
    outputs: &["text.txt"],
    params: UpperParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Upper {
    fn info(&self) -> &'static StageInfo {
        &UPPER
    }
    fn check(&self, params: &Params) -> Result<()> {
        if params.typed::<UpperParams>()?.times == 0 {
            bail!("times must be at least 1");
        }
        Ok(())
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: UpperParams = ctx.params.typed()?;
        let text = std::fs::read_to_string(ctx.upstream("letters")?.file("text.txt"))?;
        std::fs::write(ctx.out("text.txt"), text.to_uppercase().repeat(p.times))?;
        std::fs::write(ctx.out("stats.json"), format!("{{\"times\": {}}}", p.times))?;
        Ok(Summary::new())
    }
}

/// Reads `upper` and every dataset instance of it.
struct Tally;
static TALLY: StageInfo = StageInfo {
    name: "tally",
    version: 1,
    about: "count characters of every dataset",
    inputs: &["upper"],
    optional_inputs: &[],
    collects: &["upper"],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["tally.json"],
    params: NoParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Tally {
    fn info(&self) -> &'static StageInfo {
        &TALLY
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let mut s = Summary::new();
        s.insert("main".into(), std::fs::read_to_string(ctx.upstream("upper")?.file("text.txt"))?.len().into());
        for (dataset, a) in ctx.instances_of("upper") {
            s.insert(dataset.to_owned(), std::fs::read_to_string(a.file("text.txt"))?.len().into());
        }
        std::fs::write(ctx.out("tally.json"), serde_json::to_vec(&s)?)?;
        Ok(s)
    }
}

/// Makes cached sub-artifacts, one per try.
struct Search;
static SEARCH: StageInfo = StageInfo {
    name: "search",
    version: 1,
    about: "sub-artifacts",
    inputs: &["letters"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["best.txt"],
    params: SearchParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Search {
    fn info(&self) -> &'static StageInfo {
        &SEARCH
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        let p: SearchParams = ctx.params.typed()?;
        let tries = ctx.sub_artifacts("try")?;
        let (mut made, mut reused) = (0u64, 0u64);
        for i in 0..p.tries {
            let params = Params(std::collections::BTreeMap::from([("i".to_owned(), i.into())]));
            let key = tries.key(1, &params, &Default::default());
            if tries.get(&key)?.is_some() {
                reused += 1;
                continue;
            }
            let build = tries.begin(&key)?;
            std::fs::write(build.join("value.json"), format!("{}", i * i))?;
            tries.commit(&build, &key, 1, &params, Default::default(), Summary::new(), 0.0)?;
            made += 1;
        }
        std::fs::write(ctx.out("best.txt"), "done")?;
        Ok(Summary::from([("made".to_owned(), made.into()), ("reused".to_owned(), reused.into())]))
    }
}

/// Declares an output it never writes.
struct Liar;
static LIAR: StageInfo = StageInfo {
    name: "liar",
    version: 1,
    about: "forgets an output",
    inputs: &["letters"],
    optional_inputs: &[],
    collects: &[],
    per_dataset: false,
    dataset_requires: &[],
    outputs: &["promised.txt", "maybe.txt?"],
    params: NoParams::SPECS,
    placement: Placement::InProcess,
};

impl Stage for Liar {
    fn info(&self) -> &'static StageInfo {
        &LIAR
    }
    fn run(&self, ctx: &StageContext) -> Result<Summary> {
        std::fs::write(ctx.out("other.txt"), "x")?;
        Ok(Summary::new())
    }
}

fn registry() -> Vec<Box<dyn Stage>> {
    vec![Box::new(Letters), Box::new(Upper), Box::new(Tally), Box::new(Search), Box::new(Liar)]
}

/// A fresh project folder with `yaml` and a text folder of two files.
fn project(name: &str, yaml: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("engine_{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("text")).unwrap();
    std::fs::write(dir.join("text/a.txt"), "abc").unwrap();
    std::fs::write(dir.join("text/b.txt"), "de").unwrap();
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    dir
}

fn load(dir: &Path, reg: &[Box<dyn Stage>], sets: &[&str]) -> Result<config::Pipeline> {
    let overrides: Vec<config::Override> = sets.iter().map(|s| s.parse().unwrap()).collect();
    config::load(&dir.join("pipeline.yaml"), reg, None, &overrides)
}

/// (ran, reused) of one run.
fn run(dir: &Path, sets: &[&str]) -> (Vec<String>, Vec<String>) {
    let reg = registry();
    let mut e = Engine::new(load(dir, &reg, sets).unwrap(), &reg);
    e.show_progress = false;
    let r = e.run(None).unwrap();
    (r.ran, r.reused)
}

fn metrics(dir: &Path, stage: &str, sets: &[&str]) -> Summary {
    let reg = registry();
    let e = Engine::new(load(dir, &reg, sets).unwrap(), &reg);
    e.current_artifact(stage).unwrap().manifest.metrics
}

const CHAIN: &str = "data: {root: text}\nstages:\n  letters: {}\n  upper: {deps: [letters], params: {times: 2}}\n  tally: {deps: [upper]}\n";

#[test]
fn reruns_only_what_changed() {
    let dir = project("cache", CHAIN);
    assert_eq!(run(&dir, &[]).0, ["letters", "upper", "tally"]);
    assert!(run(&dir, &[]).0.is_empty(), "a second run runs nothing");
    // A middle stage's param reruns it and what follows; reverting reuses.
    assert_eq!(run(&dir, &["upper.times=3"]), (vec!["upper".to_owned(), "tally".to_owned()], vec!["letters".to_owned()]));
    assert_eq!(metrics(&dir, "tally", &["upper.times=3"])["main"], 3 * 11);
    assert!(run(&dir, &[]).0.is_empty());
    // A touched raw file is re-hashed but reruns nothing; one changed byte reruns from the source.
    let f = std::fs::File::options().write(true).open(dir.join("text/a.txt")).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    drop(f);
    assert!(run(&dir, &[]).0.is_empty());
    std::fs::write(dir.join("text/a.txt"), "abX").unwrap();
    assert_eq!(run(&dir, &[]).0, ["letters", "upper", "tally"]);
}

#[test]
fn datasets_uses_and_foreach_make_instances() {
    let yaml = "data: {root: text}\nexternal:\n  other: {root: text, label: second}\nstages:\n  letters: {}\n  upper: {deps: [letters]}\n  shout: {uses: upper, deps: [letters], params: {times: 3}}\n  twice:\n    uses: upper\n    deps: [letters]\n    foreach: {x2: {times: 2}, x4: {times: 4}}\n  tally: {deps: [upper]}\n";
    let dir = project("instances", yaml);
    let reg = registry();
    let p = load(&dir, &reg, &[]).unwrap();
    let names = p.stage_names();
    for n in ["letters.other", "upper.other", "shout", "twice.x2", "twice.x4"] {
        assert!(names.contains(&n.to_owned()), "{n} missing from {names:?}");
    }
    // The dataset's instance of upper reads its own letters, under the plain name.
    let upper_other = p.stage("upper.other").unwrap();
    assert_eq!(upper_other.deps, ["letters.other"]);
    assert_eq!(upper_other.upstream_name("letters.other"), "letters");
    // The collector depends on every dataset instance and sees it by name.
    assert!(p.stage("tally").unwrap().deps.contains(&"upper.other".to_owned()));
    run(&dir, &[]);
    let m = metrics(&dir, "tally", &[]);
    assert_eq!((m["main"].as_u64(), m["other"].as_u64()), (Some(11), Some(13)), "{m:?}");
    assert_eq!(p.stage("twice.x4").unwrap().params.0["times"], 4);
    // Instances use the registered stage's params; one with a bad value is refused at load.
    let bad = project("instances_bad", &yaml.replace("x4: {times: 4}", "x4: {times: 0}"));
    let err = load(&bad, &reg, &[]).unwrap_err().to_string();
    assert!(err.contains("stages.twice.x4.params: times must be at least 1"), "{err}");
    // -P reaches an instance whose name holds a dot.
    assert_eq!(load(&dir, &reg, &["twice.x2.times=5"]).unwrap().stage("twice.x2").unwrap().params.0["times"], 5);
    // -P on the foreach's own name sets every instance it made; a named instance wins.
    let p = load(&dir, &reg, &["twice.times=6", "twice.x4.times=7"]).unwrap();
    let times = |s: &str| p.stage(s).unwrap().params.0["times"].clone();
    assert_eq!((times("twice.x2"), times("twice.x4"), times("shout")), (6.into(), 7.into(), 3.into()));
}

#[test]
fn a_missing_declared_output_fails_the_stage_and_stores_nothing() {
    let dir = project("outputs", "data: {root: text}\nstages:\n  letters: {}\n  liar: {deps: [letters]}\n");
    let reg = registry();
    let e = Engine::new(load(&dir, &reg, &[]).unwrap(), &reg);
    let err = format!("{:#}", e.run(None).unwrap_err());
    assert!(err.contains("declares output `promised.txt` but did not write it"), "{err}");
    assert!(!dir.join("artifacts/liar").exists() || std::fs::read_dir(dir.join("artifacts/liar")).unwrap().next().is_none());
}

#[test]
fn sub_artifacts_are_cached_kept_by_gc_and_verified() {
    let dir = project("sub", "data: {root: text}\nstages:\n  letters: {}\n  search: {deps: [letters], params: {tries: 2}}\n");
    run(&dir, &[]);
    assert_eq!(metrics(&dir, "search", &[])["made"], 2);
    run(&dir, &["search.tries=3"]);
    let m = metrics(&dir, "search", &["search.tries=3"]);
    assert_eq!((m["made"].as_u64(), m["reused"].as_u64()), (Some(1), Some(2)));
    let reg = registry();
    let e = Engine::new(load(&dir, &reg, &["search.tries=3"]).unwrap(), &reg);
    let a = e.current_artifact("search").unwrap();
    assert_eq!(a.manifest.children["try"].len(), 3);
    // The current search keeps its three tries; the older search (2 tries) is unreachable.
    let dead: Vec<String> = liverseg_engine::gc::unreachable(&e, false).unwrap().iter().map(|a| format!("{}/{}", a.stage, a.key)).collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].starts_with("search/"));
    // Sub-artifacts are artifacts: listed and verified like any other.
    let subs: Vec<_> = e.store.list().unwrap().into_iter().filter(|a| a.stage == "search+try").collect();
    assert_eq!(subs.len(), 3);
    std::fs::write(subs[0].file("value.json"), "99").unwrap();
    let problems = e.store.check(&subs[0], Depth::Full);
    assert_eq!(problems.len(), 1, "{problems:?}");
    // A damaged sub-artifact is not reused: it is set aside and made again.
    run(&dir, &["search.tries=4"]);
    let m = metrics(&dir, "search", &["search.tries=4"]);
    assert_eq!((m["made"].as_u64(), m["reused"].as_u64()), (Some(2), Some(2)), "{m:?}");

    // Instances (foreach) keep their tries under their own names, where gc finds them.
    let dir = project("sub_instances", "data: {root: text}\nstages:\n  letters: {}\n  search:\n    deps: [letters]\n    foreach: {a: {tries: 2}, b: {tries: 1}}\n");
    run(&dir, &[]);
    let e = Engine::new(load(&dir, &reg, &[]).unwrap(), &reg);
    let folders: Vec<String> = e.store.list().unwrap().into_iter().filter(|a| a.stage.contains('+')).map(|a| a.stage).collect();
    assert_eq!(folders.iter().filter(|s| *s == "search.a+try").count(), 2, "{folders:?}");
    assert_eq!(folders.iter().filter(|s| *s == "search.b+try").count(), 1, "{folders:?}");
    assert!(liverseg_engine::gc::unreachable(&e, false).unwrap().is_empty(), "gc keeps what the current searches used");
}

/// Flip one byte of `path` at `at` (from the start, or from the end when negative).
fn flip(path: &Path, at: i64) {
    let mut b = std::fs::read(path).unwrap();
    let i = if at < 0 { (b.len() as i64 + at) as usize } else { at as usize };
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// A quiet engine over `dir` (its registry leaked: tests are short-lived).
fn engine_for(dir: &Path) -> Engine<'static> {
    let reg: &'static [Box<dyn Stage>] = Box::leak(registry().into_boxed_slice());
    let mut e = Engine::new(load(dir, reg, &[]).unwrap(), reg);
    e.show_progress = false;
    e
}

/// A damaged or missing upstream file is never used: `run` rebuilds the
/// artifact, `status` says damaged, a single-stage rerun refuses, and
/// `lineage` will not quote an edited manifest.
#[test]
fn damaged_artifacts_are_rebuilt_never_used() {
    let dir = project("damage", CHAIN);
    run(&dir, &[]);
    let e = engine_for(&dir);
    let upper = e.current_artifact("upper").unwrap();
    // A deleted output: the artifact is rebuilt, and so is what follows.
    std::fs::remove_file(upper.file("text.txt")).unwrap();
    let status = liverseg_engine::status::status(&e).unwrap();
    assert_eq!(status.iter().find(|s| s.stage == "upper").unwrap().state, liverseg_engine::status::StageState::Damaged);
    let (ran, _) = run(&dir, &[]);
    assert_eq!(ran, ["upper"], "only the damaged stage reruns: its new artifact is byte-identical");
    // A changed byte in a small file the next stage reads (a JSON): a
    // single-stage rerun downstream refuses it, naming the file, and so does
    // a lookup of the artifact.
    flip(&e.current_artifact("upper").unwrap().file("stats.json"), 2);
    let err = format!("{:#}", e.run_one("tally", true).unwrap_err());
    assert!(err.contains("upstream artifact upper@") && err.contains("stats.json: content changed"), "{err}");
    let err = format!("{:#}", e.current_artifact("upper").unwrap_err());
    assert!(err.contains("is damaged"), "{err}");
    // A run rebuilds it (and reuses what follows: the rebuilt upstream is byte-identical).
    assert_eq!(run(&dir, &[]).0, ["upper"]);
    // A same-size change with its mtime put back is still caught on use:
    // the write moved the file's ctime, so the quick check re-hashes it.
    let text = e.current_artifact("upper").unwrap().file("text.txt");
    let mtime = std::fs::metadata(&text).unwrap().modified().unwrap();
    flip(&text, 0);
    std::fs::File::options().write(true).open(&text).unwrap().set_modified(mtime).unwrap();
    let err = format!("{:#}", e.run_one("tally", true).unwrap_err());
    assert!(err.contains("text.txt: content changed"), "{err}");
    assert_eq!(e.run(None).unwrap().rebuilt_damaged, ["upper"]);
    // `run --verify` (verify_on_use) re-hashes everything, stamps or not.
    let mut strict = engine_for(&dir);
    strict.verify_on_use = true;
    assert!(strict.run(None).unwrap().rebuilt_damaged.is_empty());
    // An edited manifest: lineage refuses to quote it, the next run rebuilds.
    let m = e.current_artifact("letters").unwrap().dir.join("manifest.json");
    let text = std::fs::read_to_string(&m).unwrap().replace("\"chars\": 11", "\"chars\": 99");
    std::fs::write(&m, text).unwrap();
    let err = format!("{:#}", liverseg_engine::lineage::lineage(&e, "letters.chars").unwrap_err());
    assert!(err.contains("edited since it was written"), "{err}");
    run(&dir, &[]);
    assert_eq!(metrics(&dir, "letters", &[])["chars"], 11);
}

/// Every one-byte change in a manifest, an output or a sub-artifact's
/// result, and every folder without a manifest, fails a full check.
#[test]
fn verify_catches_every_byte_and_every_stray_folder() {
    let dir = project("verify_bytes", "data: {root: text}\nstages:\n  letters: {}\n  search: {deps: [letters], params: {tries: 1}}\n");
    run(&dir, &[]);
    let e = engine_for(&dir);
    let (n, problems) = e.store.audit(Depth::Full).unwrap();
    assert!(problems.is_empty() && n == 3, "{n} artifacts, {problems:?}");
    let files: Vec<PathBuf> = e.store.list().unwrap().iter().flat_map(|a| std::fs::read_dir(&a.dir).unwrap().map(|f| f.unwrap().path())).collect();
    assert!(files.len() >= 6, "{files:?}");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len() as i64;
        for at in [0, len / 2, -1] {
            flip(f, at);
            let (_, problems) = e.store.audit(Depth::Full).unwrap();
            assert!(!problems.is_empty(), "a flipped byte {at} of {} went unnoticed", f.display());
            flip(f, at);
        }
    }
    std::fs::create_dir_all(dir.join("artifacts/search/not-an-artifact")).unwrap();
    let (_, problems) = e.store.audit(Depth::Full).unwrap();
    assert!(problems.iter().any(|p| matches!(p, Problem::NoManifest(_))), "{problems:?}");
}

#[test]
fn bad_pipeline_files_name_the_place() {
    let reg = registry();
    for (yaml, want) in [
        ("stages:\n  letters: {}\n  upper: {deps: [letters], params: {times: many}}\n", "stages.upper.params.times: expected an integer"),
        ("stages:\n  letters: {}\n  upper: {}\n", "stage `upper` reads the output of `letters`, so deps must list it"),
        ("stages:\n  letters: {}\n  upper: {deps: [letters], colour: red}\n", "stages.upper: unknown key `colour`"),
        ("stages:\n  letters: {}\n  shout: {uses: nothing, deps: [letters]}\n", "stages.shout: unknown stage `nothing`"),
        ("stages:\n  letters: {}\n  twice: {uses: upper, deps: [letters], foreach: {a: {}}}\n  tally: {deps: [twice]}\n", "`twice` has instances (twice.a); name one"),
        ("stages:\n  letters: {}\n  up.per: {uses: upper, deps: [letters]}\n", "names may use letters, digits"),
        ("external: {b: {root: text}}\nstages:\n  letters: {}\n", "no stage in the pipeline reads the extra datasets"),
        ("external: {b: {label: x}}\nstages:\n  letters: {}\n  upper: {deps: [letters]}\n  tally: {deps: [upper]}\n", "external.b: needs `root`"),
        ("stages:\n  letters: {}\n  upper: {deps: [letters]}\n  shout: {uses: upper, deps: [letters]}\n  tally: {deps: [upper, shout]}\n", "`upper` and `shout` are both a `upper`"),
    ] {
        let dir = project("badyaml", yaml);
        let err = format!("{:#}", load(&dir, &reg, &[]).unwrap_err());
        assert!(err.contains(want), "wanted `{want}` in: {err}");
    }
}
