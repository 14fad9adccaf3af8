//! JSON as Python writes it: `json.dumps` (and so transformers 4 `save_pretrained`) emits bare
//! `NaN`, `Infinity` and `-Infinity`, which strict JSON (serde_json) refuses. Outside strings these
//! tokens become `{"__float__": "..."}`, the spelling transformers 5 writes and [`parse_float`]
//! reads; error positions are mapped back to the original text.

use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;

const SPECIAL: [&str; 3] = ["-Infinity", "Infinity", "NaN"];

/// Parses `text`; the error names the line and column in `text`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> std::result::Result<T, String> {
    // (end of a rewritten token in `out`, bytes it added)
    let mut out = String::with_capacity(text.len());
    let mut added: Vec<(usize, usize)> = vec![];
    let (mut in_str, mut escaped, mut last) = (false, false, 0);
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_str {
            (escaped, in_str) = (!escaped && c == b'\\', escaped || c != b'"');
        } else if c == b'"' {
            in_str = true;
        } else if let Some(t) = SPECIAL.iter().find(|t| b[i..].starts_with(t.as_bytes())) {
            out.push_str(&text[last..i]);
            let s = format!("{{\"__float__\":\"{t}\"}}");
            added.push((out.len() + s.len(), s.len() - t.len()));
            out.push_str(&s);
            i += t.len();
            last = i;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[last..]);
    serde_json::from_str(&out).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        if e.line() == 0 {
            return msg.to_string();
        }
        // serde_json counts columns in bytes from 1; rewritten tokens never span lines.
        let line_start: usize = out
            .split_inclusive('\n')
            .take(e.line() - 1)
            .map(str::len)
            .sum();
        let at = line_start + e.column();
        let shift: usize = added
            .iter()
            .filter(|&&(end, _)| end > line_start && end <= at)
            .map(|&(_, n)| n)
            .sum();
        format!(
            "{msg} at line {} column {}",
            e.line(),
            e.column().saturating_sub(shift)
        )
    })
}

/// A JSON number, or a special float as Python writes it: "NaN", "Infinity", "-Infinity" (or
/// "inf"), as a string or as `{"__float__": ...}`.
pub fn parse_float(x: &Value) -> Option<f64> {
    match x {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        Value::Object(o) => o.get("__float__").and_then(parse_float),
        _ => None,
    }
}

/// Reads and parses a JSON file; errors name the file.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// [`read`] for an optional side file: None when it does not exist.
pub fn read_opt<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if path.exists() {
        read(path).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::{from_str, parse_float};
    use serde_json::{Value, json};

    #[test]
    fn python_special_floats() {
        let v: Value = from_str(r#"{"l": [0.0, Infinity, -Infinity, NaN], "x": 1}"#).unwrap();
        let l: Vec<f64> = v["l"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| parse_float(x).unwrap())
            .collect();
        assert_eq!(l[..3], [0.0, f64::INFINITY, f64::NEG_INFINITY]);
        assert!(l[3].is_nan());
        assert_eq!(v["x"], 1);
    }

    #[test]
    fn strings_are_untouched() {
        let text = r#"{"a": "Infinity and NaN", "b\"Infinity": "-Infinity\\", "c": ["NaN"]}"#;
        let v: Value = from_str(text).unwrap();
        assert_eq!(v, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(v["c"], json!(["NaN"]));
    }

    #[test]
    fn errors_point_into_the_original_text() {
        // Same error as serde_json gives for the text with numbers of the same length in place
        // of the special floats.
        for bad in [
            "{\"a\": 1,\n \"b\": [Infinity, NaN, -Infinity, x]}",
            "{\"a\": NaN, \"b\": Infinit}",
            "[NaN,\n NaN, Infinity,\n\n 1 2]",
            "[Infinity",
        ] {
            let same = bad
                .replace("-Infinity", "-12345678")
                .replace("Infinity", "12345678");
            let want = serde_json::from_str::<Value>(&same.replace("NaN", "123")).unwrap_err();
            assert_eq!(
                from_str::<Value>(bad).unwrap_err(),
                want.to_string(),
                "{bad}"
            );
        }
        assert_eq!(parse_float(&json!("inf")), Some(f64::INFINITY));
        assert_eq!(
            parse_float(&json!({"__float__": "-Infinity"})),
            Some(f64::NEG_INFINITY)
        );
        assert_eq!(parse_float(&json!(true)), None);
    }
}
