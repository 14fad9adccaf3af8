//! The accuracy–latency figure of the budget-control results (`report.py` writes its input):
//! `cargo run --release --example pareto -- POINTS.json OUT.png`, where POINTS.json is
//! `{"title", "x", "y", "groups": [{"name", "points": [[x, y], ...]}, ...]}`.

use elastica::elastic::plot;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out] = args.as_slice() else {
        eprintln!("usage: pareto POINTS.json OUT.png");
        return std::process::ExitCode::from(2);
    };
    let run = || -> Result<(), String> {
        let text = std::fs::read_to_string(input).map_err(|e| format!("{input}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{input}: {e}"))?;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let mut groups = vec![];
        for g in v["groups"]
            .as_array()
            .ok_or(format!("{input}: no \"groups\""))?
        {
            let pts = g["points"]
                .as_array()
                .ok_or(format!("{input}: a group has no \"points\""))?
                .iter()
                .map(|p| {
                    (
                        p[0].as_f64().unwrap_or(0.0) as f32,
                        p[1].as_f64().unwrap_or(0.0) as f32,
                    )
                })
                .collect();
            groups.push((g["name"].as_str().unwrap_or_default().to_string(), pts));
        }
        plot::pareto(out.as_ref(), &s("title"), (&s("x"), &s("y")), &groups)
            .map_err(|e| e.to_string())
    };
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
