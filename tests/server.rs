//! `elastica serve` end to end: the real server on a loopback port, driven by the official
//! `openai` Python client (installed into a venv by scripts/setup-openai-venv.sh; if it cannot
//! be installed this test fails and says why) over an elastic SmolLM2 made here (rank +
//! elastify: budgets full, 0.75, 0.5) with a chat template that opens `<think>`.
//! tests/openai/test_server.py holds the client-side checks; this file starts the servers,
//! runs it, and checks the graceful exit on SIGTERM with a request in flight.

mod common;
use common::fixture;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elastica"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run_ok(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// SmolLM2 Q4_1, fetched like tests/smollm2.rs does, made elastic (rank + elastify) in `dir`.
fn elastic_smollm2(dir: &Path) -> PathBuf {
    let src = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.exists() {
        let st = Command::new("bash")
            .arg(root().join("scripts/fetch-model.sh"))
            .status();
        assert!(
            matches!(st, Ok(s) if s.success()) && src.exists(),
            "SmolLM2 could not be fetched (scripts/fetch-model.sh failed); this test needs it"
        );
    }
    let (imp, out) = (dir.join("imp.json"), dir.join("smol.gguf"));
    let calib = fixture("text/gpl-3.txt");
    run_ok(
        exe().args([
            "rank",
            s(&src),
            "--calib",
            s(&calib),
            "--samples",
            "2",
            "--seq",
            "32",
            "--out",
            s(&imp),
        ]),
        "rank",
    );
    run_ok(
        exe().args([
            "elastify",
            s(&src),
            "--importance",
            s(&imp),
            "--budgets",
            "full,0.75,0.5",
            "--out",
            s(&out),
        ]),
        "elastify",
    );
    out
}

/// The venv's python with the `openai` client, or a failure that says why.
fn openai_python() -> String {
    let o = Command::new("bash")
        .arg(root().join("scripts/setup-openai-venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the official openai client could not be installed (scripts/setup-openai-venv.sh failed, see above); the server tests need it"
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// A running server: the child, its port, and its stderr lines so far.
struct Server {
    child: Child,
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `elastica serve` on a free loopback port and waits for /health to be 200.
    fn start(args: &[&str]) -> Server {
        let mut child = exe()
            .args(["-t", "2", "serve", "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(|l| l.ok()) {
                if let Some(p) = line
                    .strip_prefix("listening on http://127.0.0.1:")
                    .and_then(|r| r.split(' ').next())
                {
                    let _ = tx.send(p.parse::<u16>().unwrap());
                }
                l2.lock().unwrap().push(line);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("the server did not start: {:?}", log.lock().unwrap()));
        let srv = Server { child, port, log };
        let t0 = Instant::now();
        loop {
            match srv.get("/health") {
                Some(200) => break,
                Some(503) | None => {}
                Some(s) => panic!("/health answered {s}"),
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "the server did not become ready: {:?}",
                srv.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        srv
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The status of a GET (None: no connection).
    fn get(&self, path: &str) -> Option<u16> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut r = String::new();
        c.read_to_string(&mut r).ok()?;
        r.split(' ').nth(1)?.parse().ok()
    }

    fn sigterm(&self) {
        // Safety: sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn openai_client_against_the_server() {
    let dir = std::env::temp_dir().join(format!("elastica-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let python = openai_python();
    let model = elastic_smollm2(&dir);
    let template = fixture("templates/chatml-think.jinja");
    let key = "sk-elastica-test";
    let main = Server::start(&[
        s(&model),
        "--alias",
        "smol",
        "--parallel",
        "8",
        "--ctx",
        "512",
        "--chat-template",
        s(&template),
        "--api-key",
        key,
        "--max-body",
        "65536",
        "--speculate",
        "0.5",
        "--draft",
        "4",
    ]);
    // A second server with one slot and a queue of one, for the refusal when the queue is full.
    let tiny = Server::start(&[
        s(&fixture("llama_tiny")),
        "--parallel",
        "1",
        "--queue",
        "1",
        "--ctx",
        "4096",
        "--force-ctx",
    ]);
    let st = Command::new(&python)
        .arg(root().join("tests/openai/test_server.py"))
        .env("ELASTICA_URL", main.url())
        .env("ELASTICA_TINY_URL", tiny.url())
        .env("ELASTICA_API_KEY", key)
        .env("ELASTICA_BIN", env!("CARGO_BIN_EXE_elastica"))
        .env("ELASTICA_MODEL", &model)
        .env("ELASTICA_TEMPLATE", &template)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "tests/openai/test_server.py failed (see its output above); server log:\n{}",
        main.log.lock().unwrap().join("\n")
    );
    // One log line per request: id, budget(s), tokens, seconds.
    let log = main.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.starts_with("chatcmpl-")
            && l.contains(" budget=0.5->full ")
            && l.contains(" completion=")),
        "no request log line with a budget schedule: {log:?}"
    );

    // SIGTERM with a streaming request in flight: it finishes, the server exits 0.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", main.port)).unwrap();
    let body = r#"{"model":"smol","prompt":"Once upon a time","max_tokens":60,"temperature":0,"ignore_eos":true,"stream":true}"#;
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(c);
    let mut line = String::new();
    while !line.starts_with("data: {") {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
    }
    main.sigterm();
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"),
        "the in-flight request did not finish after SIGTERM: {rest}"
    );
    let mut main = main;
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = main.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status:?}");
    drop(tiny);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad flags and a bad model are refused before serving, naming the flag or file; a port in
/// use is an error, not a panic.
#[test]
fn bad_serve_flags_are_errors() {
    let bad = |args: &[&str], want: &str| {
        let o = exe().arg("serve").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    };
    let tiny = fixture("llama_tiny");
    bad(&["/no/such/model.gguf"], "no such file");
    bad(&[s(&tiny), "--parallel", "0"], "--parallel");
    bad(&[s(&tiny), "--draft", "17"], "--draft");
    bad(&[s(&tiny), "--port", "70000"], "--port");
    bad(&[s(&tiny), "--alias", "a:b"], "--alias");
    bad(
        &[s(&tiny), "--chat-template", "/no/such/template"],
        "template",
    );
    bad(
        &[s(&tiny), "--port", "0", "--budget", "nonsense"],
        "--budget",
    );
    bad(
        &[s(&tiny), "--port", "0", "--speculate", "nonsense"],
        "--speculate",
    );
    bad(&[s(&tiny), "--port", "0", "--ctx", "1000000"], "--ctx");
    // The port is taken.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port().to_string();
    bad(&[s(&tiny), "--port", &port], "cannot listen");
}
