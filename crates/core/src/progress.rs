//! Progress of long commands (rank, elastify, slice, train, perplexity, gen-data), on stderr:
//! an indicatif bar on a terminal; otherwise a plain line every few seconds
//! (`elastify: solve 12.4/33.6 M params, 35 s, ...`), or with `--json` one JSON object per line
//! (`{"progress":"elastify","stage":"solve","done":..,"total":..,"unit":..,"seconds":..,"msg":..}`).
//! `ELASTICA_PROGRESS_SECS` sets the interval of the plain and JSON lines (default 5; 0 prints
//! every update, for tests and logs).

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a stage counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Plain counts, named by the string (`chunks`, `steps`, `sequences`).
    Count(&'static str),
    Bytes,
    /// Parameters (shown in millions).
    Params,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Bar,
    Lines,
    Json,
}

struct State {
    stage: String,
    unit: Unit,
    done: u64,
    total: u64,
    msg: String,
    last: Option<Instant>,
}

struct Shared {
    cmd: &'static str,
    mode: Mode,
    t0: Instant,
    every: Duration,
    state: Mutex<State>,
    bar: Mutex<Option<ProgressBar>>,
    stop: AtomicBool,
}

/// Progress reporter of one command; cheap to share by reference across threads.
pub struct Progress {
    s: Arc<Shared>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

fn amount(u: Unit, x: u64) -> String {
    match u {
        Unit::Count(_) => x.to_string(),
        Unit::Bytes => format!("{:.1}", x as f64 / (1 << 20) as f64),
        Unit::Params => format!("{:.2}", x as f64 / 1e6),
    }
}

fn unit_name(u: Unit) -> &'static str {
    match u {
        Unit::Count(n) => n,
        Unit::Bytes => "MiB",
        Unit::Params => "M params",
    }
}

impl Shared {
    fn line(&self, st: &State) -> String {
        let secs = self.t0.elapsed().as_secs_f64();
        if self.mode == Mode::Json {
            return json!({
                "progress": self.cmd, "stage": st.stage, "done": st.done, "total": st.total,
                "unit": unit_name(st.unit), "seconds": (secs * 10.0).round() / 10.0, "msg": st.msg,
            })
            .to_string();
        }
        let mut s = format!("{}: {}", self.cmd, st.stage);
        if st.total > 0 {
            s += &format!(
                " {}/{} {}",
                amount(st.unit, st.done),
                amount(st.unit, st.total),
                unit_name(st.unit)
            );
        } else if st.done > 0 {
            s += &format!(" {} {}", amount(st.unit, st.done), unit_name(st.unit));
        }
        s += &format!(", {secs:.0} s");
        if !st.msg.is_empty() {
            s += &format!(", {}", st.msg);
        }
        s
    }

    fn emit(&self, st: &mut State) {
        st.last = Some(Instant::now());
        let l = self.line(st);
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "{l}");
    }

    /// Prints a line when the interval has passed since the last one.
    fn maybe(&self, st: &mut State) {
        // The first line after one interval too: quick commands stay quiet.
        if matches!(self.mode, Mode::Lines | Mode::Json)
            && st.last.unwrap_or(self.t0).elapsed() >= self.every
        {
            self.emit(st);
        }
    }
}

impl Progress {
    /// Bars on a terminal, lines (JSON with `json`) otherwise.
    pub fn new(cmd: &'static str, json: bool) -> Progress {
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Progress::with_mode(cmd, mode)
    }

    /// Reports nothing.
    pub fn hidden() -> Progress {
        Progress::with_mode("", Mode::Off)
    }

    /// `new` when `on`, else `hidden`.
    pub fn new_if(on: bool, cmd: &'static str, json: bool) -> Progress {
        if on {
            Progress::new(cmd, json)
        } else {
            Progress::hidden()
        }
    }

    fn with_mode(cmd: &'static str, mode: Mode) -> Progress {
        let every = std::env::var("ELASTICA_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .unwrap_or(5.0)
            .min(86400.0);
        let s = Arc::new(Shared {
            cmd,
            mode,
            t0: Instant::now(),
            every: Duration::from_secs_f64(every),
            state: Mutex::new(State {
                stage: String::new(),
                unit: Unit::Count(""),
                done: 0,
                total: 0,
                msg: String::new(),
                last: None,
            }),
            bar: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        // Lines also come during long single steps (a forward of minutes), not only on updates.
        let ticker = (matches!(mode, Mode::Lines | Mode::Json) && every > 0.0).then(|| {
            let s = s.clone();
            std::thread::spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_millis(250));
                    let mut st = s.state.lock().unwrap();
                    if !st.stage.is_empty() && !s.stop.load(Ordering::Relaxed) {
                        s.maybe(&mut st);
                    }
                }
            })
        });
        Progress { s, ticker }
    }

    /// Starts a stage (`write`, `solve`, ...) of `total` units (0 = unknown).
    pub fn stage(&self, stage: &str, total: u64, unit: Unit) {
        let mut st = self.s.state.lock().unwrap();
        *st = State {
            stage: stage.into(),
            unit,
            done: 0,
            total,
            msg: String::new(),
            last: st.last,
        };
        if self.s.mode == Mode::Bar {
            let tpl = match unit {
                Unit::Bytes => format!(
                    "{stage} {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
                ),
                Unit::Params => format!(
                    "{stage} {{bar:30}} {{human_pos}}/{{human_len}} params [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
                ),
                Unit::Count(n) => format!(
                    "{stage} {{bar:30}} {{pos}}/{{len}} {n} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
                ),
            };
            let pb = ProgressBar::new(total);
            pb.set_style(ProgressStyle::with_template(&tpl).unwrap());
            pb.enable_steady_tick(Duration::from_secs(1));
            if let Some(old) = self.s.bar.lock().unwrap().replace(pb) {
                old.finish_and_clear();
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.s.state.lock().unwrap();
        f(&mut st);
        if let Some(pb) = self.s.bar.lock().unwrap().as_ref() {
            pb.set_length(st.total);
            pb.set_position(st.done);
            pb.set_message(st.msg.clone());
        }
        self.s.maybe(&mut st);
    }

    pub fn set(&self, done: u64) {
        self.update(|st| st.done = done);
    }

    pub fn inc(&self, n: u64) {
        self.update(|st| st.done += n);
    }

    /// Sets done, total and the message at once.
    pub fn status(&self, done: u64, total: u64, msg: impl Into<String>) {
        let msg = msg.into();
        self.update(|st| {
            st.done = done;
            st.total = total;
            st.msg = msg;
        });
    }

    pub fn message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.update(|st| st.msg = msg);
    }

    /// Ends the current stage (the bar is cleared).
    pub fn finish(&self) {
        if let Some(pb) = self.s.bar.lock().unwrap().take() {
            pb.finish_and_clear();
        }
        self.s.state.lock().unwrap().stage.clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
        self.s.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
