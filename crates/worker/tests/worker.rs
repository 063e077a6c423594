//! A worker dies with the engine that started it, even when the engine is
//! killed while the worker is still starting (loading libtorch): an orphan
//! would go on training and race a rerun of the same key over its checkpoint.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn liverseg() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_liverseg-torch")).with_file_name("liverseg")
}

/// (parent pid, state) of a process, from /proc; None once it is gone.
fn stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so read after the last ')'.
    let mut rest = s[s.rfind(')')? + 2..].split(' ');
    let state = rest.next()?.chars().next()?;
    Some((rest.next()?.parse().ok()?, state))
}

fn children_of(parent: u32) -> Vec<u32> {
    let procs = std::fs::read_dir("/proc").map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect()).unwrap_or_else(|_| Vec::new());
    procs.into_iter().filter(|&p| stat(p).map(|(pp, _)| pp) == Some(parent)).collect()
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

#[test]
fn worker_dies_with_a_killed_engine_even_while_starting() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker_orphan");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("pipeline.yaml"),
        "data: {source: synthetic, synthetic_cases: 6, synthetic_size: 32, synthetic_slices: 4}\nstages:\n  ingest: {}\n  normalise: {deps: [ingest], params: {size: 32}}\n  split: {deps: [normalise]}\n  augment: {deps: [normalise, split]}\n  train: {deps: [normalise, split, augment], params: {encoder: resnet18, epochs: 50, threads: 1}}\n",
    )
    .unwrap();
    assert!(Command::new(liverseg()).args(["run", "augment", "-q"]).current_dir(&dir).status().unwrap().success());
    for attempt in 0..3 {
        let mut engine = Command::new(liverseg()).args(["run", "train", "-q"]).current_dir(&dir).spawn().unwrap();
        // Kill the engine the moment its worker exists, before the worker's own main runs.
        let t0 = Instant::now();
        let worker = loop {
            if let Some(&w) = children_of(engine.id()).first() {
                break w;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no worker started");
            std::thread::sleep(Duration::from_micros(200));
        };
        engine.kill().unwrap();
        engine.wait().unwrap();
        let t0 = Instant::now();
        while alive(worker) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(worker) {
            let _ = Command::new("kill").args(["-9", &worker.to_string()]).status();
            panic!("attempt {attempt}: worker {worker} outlived its killed engine");
        }
    }
}
