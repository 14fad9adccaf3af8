//! Text data for calibration, evaluation and training: plain text files, or JSONL with a
//! `"text"` field per line.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A UTF-8 text file, refused by name when missing or not UTF-8.
pub fn read_text(f: &Path) -> Result<String> {
    let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::format(
            f,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Reads every document of the given files, refusing empty or non-UTF-8 input by name.
pub fn read_texts(files: &[PathBuf]) -> Result<Vec<String>> {
    if files.is_empty() {
        return Err(Error::Input("no data files given".into()));
    }
    let mut out = vec![];
    for f in files {
        let text = read_text(f)?;
        let before = out.len();
        if is_jsonl(f) {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = crate::formats::json::from_str(line)
                    .map_err(|e| Error::format(f, format!("line {}: invalid JSON: {e}", i + 1)))?;
                let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::format(f, format!("line {}: no \"text\" string", i + 1))
                })?;
                if !t.trim().is_empty() {
                    out.push(t.to_string());
                }
            }
        } else if !text.trim().is_empty() {
            out.push(text);
        }
        if out.len() == before {
            return Err(Error::format(f, "holds no text"));
        }
    }
    Ok(out)
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "jsonl" || e == "json")
}

/// All documents tokenized (no special tokens) and concatenated.
pub fn tokenize_all(
    tok: &crate::generate::tokenizer::Tokenizer,
    texts: &[String],
) -> Result<Vec<u32>> {
    let mut ids = vec![];
    for t in texts {
        ids.extend(tok.encode(t, false)?);
    }
    Ok(ids)
}
