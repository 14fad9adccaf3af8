//! Temporary outputs. Everything elastica writes goes first to a hidden sibling of its
//! destination, `.NAME.tmp-PID` (`.NAME.stage-PID` for an intermediate model), which is
//! registered here, then renamed into place by [`commit`]. A temporary that is not committed is
//! removed when dropped (errors, panics) or, through [`remove_on_signals`], on SIGINT/SIGTERM.
//! Making one first sweeps the temporaries of the same destination left by dead processes.

use crate::error::{Error, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Temporaries not yet committed or removed. Held while a commit renames, so that a signal
/// finds either every output of a command in place or none of them.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Name kinds: a temporary output, an intermediate model, an output moved aside by a commit.
const KINDS: [&str; 3] = ["tmp", "stage", "old"];

/// A registered temporary for `dest`; derefs to its path.
pub struct Temp {
    path: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Temp {
    /// `.NAME.tmp-PID` beside `dest`.
    pub fn new(dest: &Path) -> Result<Temp> {
        Temp::make(dest, "tmp", false)
    }
    /// `.NAME.tmp-PID.EXT`, for writers that choose the format by the extension.
    pub fn with_ext(dest: &Path) -> Result<Temp> {
        Temp::make(dest, "tmp", true)
    }
    /// `.NAME.stage-PID`: an intermediate that is never committed (removed when dropped).
    pub fn stage(dest: &Path) -> Result<Temp> {
        Temp::make(dest, "stage", false)
    }

    fn make(dest: &Path, kind: &str, keep_ext: bool) -> Result<Temp> {
        let dir = folder(dest);
        if !dir.is_dir() {
            return Err(Error::Input(format!(
                "{}: folder {} does not exist",
                dest.display(),
                dir.display()
            )));
        }
        sweep(dest);
        let ext = match dest.extension() {
            Some(e) if keep_ext => format!(".{}", e.to_string_lossy()),
            _ => String::new(),
        };
        let path = sibling(dest, kind, &ext);
        let mut live = registry();
        remove(&path);
        live.push(path.clone());
        Ok(Temp {
            path,
            dest: dest.to_path_buf(),
            done: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for Temp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Temp {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for Temp {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.done {
            let mut live = registry();
            remove(&self.path);
            live.retain(|p| p != &self.path);
        }
    }
}

/// Held while a file or folder is created: the signal thread takes the registry and never gives
/// it back, so nothing is created after it removed the temporaries.
pub fn creating() -> impl Drop {
    registry()
}

/// `File::create` under [`creating`].
pub fn create_file(p: &Path) -> Result<std::fs::File> {
    let _g = creating();
    std::fs::File::create(p).map_err(|e| Error::io(p, e))
}

/// `create_dir_all` under [`creating`].
pub fn create_dir_all(p: &Path) -> Result<()> {
    let _g = creating();
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

/// `fs::write` under [`creating`] (the file is created, then written, with the registry held).
pub fn write(p: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    let _g = creating();
    std::fs::write(p, contents).map_err(|e| Error::io(p, e))
}

/// Renames every temporary onto its destination, all or none: an existing destination is moved
/// aside first and put back if a later rename fails; a signal cannot fall in between.
pub fn commit(temps: impl IntoIterator<Item = Temp>) -> Result<()> {
    let mut temps: Vec<Temp> = temps.into_iter().collect();
    let mut live = registry();
    let mut moved: Vec<(usize, Option<PathBuf>)> = vec![];
    let mut failed = None;
    for (i, t) in temps.iter().enumerate() {
        let aside = if t.dest.symlink_metadata().is_ok() {
            let b = sibling(&t.dest, "old", "");
            remove(&b);
            if let Err(e) = std::fs::rename(&t.dest, &b) {
                failed = Some(Error::io(&t.dest, e));
                break;
            }
            Some(b)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&t.path, &t.dest) {
            if let Some(b) = &aside {
                let _ = std::fs::rename(b, &t.dest);
            }
            failed = Some(Error::io(&t.dest, e));
            break;
        }
        moved.push((i, aside));
    }
    if let Some(e) = failed {
        for (i, aside) in moved.into_iter().rev() {
            let t = &temps[i];
            let _ = std::fs::rename(&t.dest, &t.path);
            if let Some(b) = aside {
                let _ = std::fs::rename(&b, &t.dest);
            }
        }
        drop(live);
        return Err(e);
    }
    for t in &mut temps {
        live.retain(|p| p != &t.path);
        t.done = true;
    }
    let old: Vec<PathBuf> = moved.into_iter().filter_map(|(_, b)| b).collect();
    live.extend(old.iter().cloned());
    drop(live);
    for b in &old {
        remove(b);
    }
    registry().retain(|p| !old.contains(p));
    Ok(())
}

/// Removes the temporaries of `dest` whose process has ended; an output moved aside by a commit
/// that never finished is put back when `dest` is missing. Live processes' are never touched.
pub fn sweep(dest: &Path) {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(folder(dest)) else {
        return;
    };
    for e in entries.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        let Some((kind, pids)) = temp_of(&entry, &name) else {
            continue;
        };
        if pids.iter().any(|&p| alive(p)) {
            continue;
        }
        let p = e.path();
        if kind == "old" && pids.len() == 1 && dest.symlink_metadata().is_err() {
            if std::fs::rename(&p, dest).is_ok() {
                eprintln!(
                    "note: put back {} (moved aside by process {}, which ended)",
                    dest.display(),
                    pids[0]
                );
            }
        } else if remove(&p) {
            eprintln!(
                "note: removed {} (left by process {}, which ended)",
                p.display(),
                pids[0]
            );
        }
    }
}

/// If `entry` is a temporary of `name` (possibly a temporary of a temporary, like
/// `..NAME.stage-PID.tmp-PID`): the outer kind and the PIDs from the outside in.
fn temp_of(entry: &str, name: &str) -> Option<(&'static str, Vec<u32>)> {
    let mut s = entry;
    let mut pids = vec![];
    let mut outer = None;
    while s != name {
        let inner = s.strip_prefix('.')?;
        // The last `.KIND-` marker; the PID after it, then nothing or `.EXT`.
        let (at, kind) = KINDS
            .iter()
            .filter_map(|k| inner.rfind(&format!(".{k}-")).map(|i| (i, *k)))
            .max_by_key(|x| x.0)?;
        let rest = &inner[at + kind.len() + 2..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let after = &rest[digits..];
        if digits == 0 || !(after.is_empty() || after.starts_with('.')) {
            return None;
        }
        pids.push(rest[..digits].parse().ok()?);
        outer.get_or_insert(kind);
        s = &inner[..at];
    }
    Some((outer?, pids))
}

/// Whether process `pid` may be running: unknown (no /proc) counts as running.
fn alive(pid: u32) -> bool {
    pid == std::process::id()
        || !Path::new("/proc/self").exists()
        || Path::new(&format!("/proc/{pid}")).exists()
}

fn folder(dest: &Path) -> &Path {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sibling(dest: &Path, kind: &str, ext: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{kind}-{}{ext}", std::process::id()))
}

/// Removes a file or folder; true when something was there.
fn remove(p: &Path) -> bool {
    let Ok(md) = p.symlink_metadata() else {
        return false;
    };
    if md.is_dir() {
        // A writer may still add a file while the folder is emptied: try again.
        for _ in 0..5 {
            if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                break;
            }
        }
    } else {
        let _ = std::fs::remove_file(p);
    }
    true
}

/// On SIGINT or SIGTERM: removes every registered temporary, prints one line and exits with
/// 128 + the signal (130, 143). For the binary; call once.
pub fn remove_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| Error::Input(format!("signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let Some(sig) = signals.forever().next() else {
                return;
            };
            // Held until the process ends: no commit or new temporary can follow.
            let live = registry();
            let removed = live.iter().filter(|p| remove(p)).count();
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            let lead = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                "\n"
            } else {
                ""
            };
            let what = match removed {
                0 => String::new(),
                n => format!("; removed {n} unfinished output(s)"),
            };
            eprintln!("{lead}interrupted by {name}{what}");
            std::process::exit(128 + sig);
        })
        .map_err(|e| Error::Input(format!("signal thread: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("elastica-temp-{tag}-{}", std::process::id()));
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

    /// A PID no process has: a child that has been waited for.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    }

    #[test]
    fn nothing_is_created_while_the_registry_is_held() {
        // The signal thread holds the registry from its clean-up until the process exits.
        let d = scratch("hold");
        let f = d.join("f");
        let held = creating();
        let t = {
            let f = f.clone();
            std::thread::spawn(move || create_file(&f).map(drop))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!f.exists(), "created while the registry was held");
        drop(held);
        t.join().unwrap().unwrap();
        assert!(f.exists());
        std::fs::remove_dir_all(&d).ok();
    }
    #[test]
    fn temp_names() {
        assert_eq!(temp_of(".a.gguf.tmp-12", "a.gguf"), Some(("tmp", vec![12])));
        assert_eq!(temp_of(".p.png.tmp-7.png", "p.png"), Some(("tmp", vec![7])));
        assert_eq!(
            temp_of("..e.gguf.stage-5.tmp-5", "e.gguf"),
            Some(("tmp", vec![5, 5]))
        );
        assert_eq!(temp_of(".x.tmp-3.old-4", "x.tmp-3"), Some(("old", vec![4])));
        for other in [
            "a.gguf",
            ".a.gguf",
            ".b.gguf.tmp-12",
            ".a.gguf.tmp-",
            ".a.gguf.tmp-1x",
            ".a.gguf.copy-1",
        ] {
            assert_eq!(temp_of(other, "a.gguf"), None, "{other}");
        }
    }

    #[test]
    fn commit_is_all_or_none() {
        let d = scratch("commit");
        let (x, y) = (d.join("x.json"), d.join("y"));
        std::fs::write(&x, "old").unwrap();
        let tx = Temp::new(&x).unwrap();
        std::fs::write(&tx, "new").unwrap();
        let ty = Temp::new(&y).unwrap(); // never written: its rename fails
        let e = commit([tx, ty]).unwrap_err().to_string();
        assert!(e.contains("/y:"), "{e}");
        assert_eq!(std::fs::read_to_string(&x).unwrap(), "old");
        assert_eq!(names(&d), ["x.json"]);

        let tx = Temp::new(&x).unwrap();
        std::fs::write(&tx, "new").unwrap();
        let ty = Temp::new(&y).unwrap();
        std::fs::create_dir(&ty).unwrap();
        std::fs::write(ty.join("f"), "1").unwrap();
        commit([tx, ty]).unwrap();
        assert_eq!(std::fs::read_to_string(&x).unwrap(), "new");
        assert_eq!(names(&d), ["x.json", "y"]);
        assert!(!registry().iter().any(|p| p.starts_with(&d)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn dropped_temps_are_removed() {
        let d = scratch("drop");
        let t = Temp::stage(&d.join("m.gguf")).unwrap();
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join("f"), "1").unwrap();
        assert_eq!(names(&d).len(), 1);
        drop(t);
        assert!(names(&d).is_empty());
        let e = Temp::new(&d.join("no/such/x")).err().unwrap().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sweep_keeps_live_and_puts_back_moved_outputs() {
        let d = scratch("sweep");
        let dead = dead_pid();
        let me = std::process::id();
        std::fs::write(d.join(format!(".m.old-{dead}")), "previous").unwrap();
        std::fs::write(d.join(format!(".m.tmp-{dead}")), "partial").unwrap();
        std::fs::write(d.join(format!(".m.tmp-{me}")), "live").unwrap();
        std::fs::write(d.join(format!(".n.tmp-{dead}")), "other output").unwrap();
        sweep(&d.join("m"));
        assert_eq!(
            names(&d),
            [format!(".m.tmp-{me}"), format!(".n.tmp-{dead}"), "m".into()]
        );
        assert_eq!(std::fs::read_to_string(d.join("m")).unwrap(), "previous");
        // With the output in place, a moved-aside copy is stale.
        std::fs::write(d.join(format!(".m.old-{dead}")), "older").unwrap();
        sweep(&d.join("m"));
        assert_eq!(std::fs::read_to_string(d.join("m")).unwrap(), "previous");
        assert!(!d.join(format!(".m.old-{dead}")).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
