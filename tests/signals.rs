//! Interrupted and failed runs leave nothing behind: SIGINT/SIGTERM sent to the real binary in the
//! middle of a write, stale temporaries of dead processes swept (live ones kept), and commands
//! with several outputs write all of them or none.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elastica"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-sig-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The real model (large enough that a write takes a while), fetched like tests/smollm2.rs does.
fn smollm2() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        let st = Command::new("bash")
            .arg(root.join("scripts/fetch-model.sh"))
            .status();
        assert!(
            matches!(st, Ok(s) if s.success()) && path.exists(),
            "SmolLM2 could not be fetched (scripts/fetch-model.sh failed); this test needs it"
        );
    }
    path
}

/// Size of a file, or of the files in a folder.
fn size(p: &Path) -> u64 {
    match std::fs::read_dir(p) {
        Ok(rd) => rd.flatten().map(|e| size(&e.path())).sum(),
        Err(_) => std::fs::metadata(p).map_or(0, |m| m.len()),
    }
}

/// Starts `cmd`, waits until `ready` finds its temporary in `dir` (by name and size), sends
/// `sig` and returns the exit status and stderr. A run that finishes before the signal lands is
/// started again (the output it wrote removed first).
fn interrupt(
    args: &[&str],
    dir: &Path,
    out: &Path,
    ready: &dyn Fn(&str, u64) -> bool,
    sig: i32,
) -> (ExitStatus, String) {
    for _ in 0..3 {
        let mut child: Child = exe()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let o = child.wait_with_output().unwrap();
                panic!(
                    "{args:?} ended ({st}) before its temporary appeared: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let found = names(dir)
                .iter()
                .any(|n| n.starts_with('.') && ready(n, size(&dir.join(n))));
            if found {
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                child.kill().unwrap();
                panic!("{args:?}: no temporary in {} after 600 s", dir.display());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Safety: a signal to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        if o.status.success() {
            // Finished first: nothing was interrupted; try again.
            let _ = std::fs::remove_dir_all(out);
            let _ = std::fs::remove_file(out);
            continue;
        }
        return (o.status, err);
    }
    panic!("{args:?} finished before the signal three times");
}

const MB: u64 = 1 << 20;

#[test]
fn sigterm_during_slice_leaves_nothing() {
    let dir = tmp("slice-gguf");
    let out = dir.join("s.gguf");
    let (st, err) = interrupt(
        &[
            "slice",
            s(&smollm2()),
            "--budget",
            "full",
            "--dtype",
            "f32",
            "--out",
            s(&out),
            "--json",
            "-t",
            "1",
        ],
        &dir,
        &out,
        &|n, len| n.starts_with(".s.gguf.tmp-") && len > 16 * MB,
        libc::SIGTERM,
    );
    assert_eq!(names(&dir), Vec::<String>::new(), "{err}");
    assert_eq!(st.code(), Some(143), "{st}: {err}");
    assert!(
        err.trim_end()
            .ends_with("interrupted by SIGTERM; removed 1 unfinished output(s)"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigint_during_slice_to_hf_leaves_nothing() {
    let dir = tmp("slice-hf");
    let out = dir.join("hf");
    let (st, err) = interrupt(
        &[
            "slice",
            s(&smollm2()),
            "--budget",
            "full",
            "--format",
            "hf",
            "--out",
            s(&out),
            "--json",
            "-t",
            "1",
        ],
        &dir,
        &out,
        &|n, len| n.starts_with(".hf.tmp-") && len > 16 * MB,
        libc::SIGINT,
    );
    assert_eq!(names(&dir), Vec::<String>::new(), "{err}");
    assert_eq!(st.code(), Some(130), "{st}: {err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `elastify --calib` writes the re-ordered model to `.OUT.stage-PID`, then runs the solver on
/// it: a signal then removes the stage (540 MB here), which used to stay.
#[test]
fn sigterm_during_elastify_removes_the_stage() {
    let work = tmp("elastify-in");
    let imp = work.join("imp.json");
    let o = exe()
        .args([
            "rank",
            s(&smollm2()),
            "--calib",
            s(&fixture("text/gpl-3.txt")),
            "--samples",
            "1",
            "--seq",
            "16",
            "--out",
            s(&imp),
            "-t",
            "1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tmp("elastify-out");
    let out = dir.join("el.gguf");
    let (st, err) = interrupt(
        &[
            "elastify",
            s(&smollm2()),
            "--importance",
            s(&imp),
            "--budgets",
            "full,0.75",
            "--calib",
            s(&fixture("text/gpl-3.txt")),
            "--solve-samples",
            "1",
            "--solve-seq",
            "16",
            "--out",
            s(&out),
            "--json",
            "-t",
            "1",
        ],
        &dir,
        &out,
        // The finished stage (renamed from its own temporary).
        &|n, _| n.starts_with(".el.gguf.stage-") && !n.contains(".tmp-"),
        libc::SIGTERM,
    );
    assert_eq!(names(&dir), Vec::<String>::new(), "{err}");
    assert_eq!(st.code(), Some(143), "{st}: {err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&work).unwrap();
}

/// A PID that no process has: a child that has been waited for.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    c.wait().unwrap();
    c.id()
}

/// A live process of our own, ended when dropped (also when the test fails).
struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stale_temporaries_of_dead_processes_are_swept() {
    let dir = tmp("sweep");
    let out = dir.join("out");
    let dead = dead_pid();
    let sleeper = Sleeper(
        Command::new("sleep")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let live = sleeper.0.id();
    let me = std::process::id();
    let plant_dir = |n: &str| {
        std::fs::create_dir_all(dir.join(n)).unwrap();
        std::fs::write(dir.join(n).join("model.safetensors"), [0u8; 64]).unwrap();
    };
    let removed = [
        format!(".out.tmp-{dead}"),
        format!(".out.stage-{dead}"),
        format!("..out.stage-{dead}.tmp-{dead}"),
    ];
    let kept = [
        format!(".out.tmp-{live}"),
        format!(".out.stage-{me}"),
        format!(".other.tmp-{dead}"),
        format!(".out.tmp-{dead}x"),
    ];
    for n in removed.iter().chain(&kept) {
        plant_dir(n);
    }
    let o = exe()
        .args([
            "slice",
            s(&fixture("llama_tiny")),
            "--budget",
            "full",
            "--out",
            s(&out),
            "--json",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    for n in &removed {
        assert!(!dir.join(n).exists(), "{n} was not removed");
        assert!(
            err.contains(&format!("removed {}", dir.join(n).display())),
            "{err}"
        );
    }
    let mut want: Vec<String> = kept.to_vec();
    want.push("out".into());
    want.sort();
    assert_eq!(names(&dir), want);
    drop(sleeper);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `rank --out X --plot Y`: when the plot cannot be drawn, X is not written either.
#[test]
fn rank_writes_both_outputs_or_none() {
    let dir = tmp("rank");
    let (json, png) = (dir.join("imp.json"), dir.join("imp.png"));
    let rank = |plot: &Path| {
        let mut c = exe();
        c.args([
            "rank",
            s(&fixture("llama_tiny")),
            "--calib",
            s(&fixture("text/gpl-3.txt")),
            "--samples",
            "2",
            "--seq",
            "16",
            "--out",
            s(&json),
            "--plot",
            s(plot),
        ]);
        c
    };
    // No usable font: the plot fails after the ranking.
    let not_a_font = fixture("text/gpl-3.txt");
    let o = rank(&png)
        .env("ELASTICA_FONT", &not_a_font)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not a usable font"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(names(&dir), Vec::<String>::new());
    // A plot in a folder that does not exist: refused before the ranking.
    let o = rank(&dir.join("no/such/imp.png")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("folder") && err.contains("no/such"), "{err}");
    assert_eq!(names(&dir), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}
