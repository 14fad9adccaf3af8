//! Thinking markers of chat templates: the end-of-thinking text and the token sequence it is
//! (several BPE tokens in some vocabularies), for budget control (issue 11, point 5).

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Start and end markers of reasoning, as chat templates write them.
pub const MARKERS: &[(&str, &str)] = &[
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("◁think▷", "◁/think▷"),
];

/// The end-of-thinking marker: its text and its tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinkMarker {
    pub text: String,
    pub tokens: Vec<u32>,
}

/// The end-of-thinking marker of a model: `end` when given (`--think-end`), else the end of the
/// first of [`MARKERS`] the chat template writes (either half: a template may open the
/// reasoning in the generation prompt only). Tokenized alone, without BOS.
pub fn think_end(
    template: Option<&str>,
    tok: &Tokenizer,
    end: Option<&str>,
) -> Result<ThinkMarker> {
    let text = match (end, template) {
        (Some(""), _) => return Err(Error::Input("--think-end is empty".into())),
        (Some(e), _) => e,
        (None, None) => {
            return Err(Error::Input(
                "the model has no chat template, so no end-of-thinking marker: name it with --think-end"
                    .into(),
            ));
        }
        (None, Some(t)) => MARKERS
            .iter()
            .find(|(s, e)| t.contains(s) || t.contains(e))
            .map(|m| m.1)
            .ok_or_else(|| {
                let known: Vec<_> = MARKERS.iter().map(|m| format!("{} {}", m.0, m.1)).collect();
                Error::Input(format!(
                    "the chat template has no thinking markers (looked for {}): name the end-of-thinking text with --think-end",
                    known.join(", ")
                ))
            })?,
    };
    let tokens = tok.encode(text, false)?;
    if tokens.is_empty() {
        return Err(Error::Input(format!(
            "the end-of-thinking marker {text:?} encodes to no tokens"
        )));
    }
    Ok(ThinkMarker {
        text: text.to_string(),
        tokens,
    })
}
