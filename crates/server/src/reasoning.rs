//! The reasoning split: text between the thinking markers goes to `reasoning_content` /
//! `reasoning`, the rest to `content`, as llama.cpp's and vLLM's reasoning parsers do. Works on
//! streamed deltas: a marker split across deltas is held back until it is whole.

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Nothing seen yet: the output may open with the start marker.
    Start,
    Reasoning,
    /// After the end marker (`trim`: leading whitespace not yet skipped) or without reasoning.
    Content {
        trim: bool,
    },
}

pub struct Splitter {
    start: String,
    end: String,
    state: State,
    held: String,
}

/// The length of the longest suffix of `s` that is a proper prefix of `marker`.
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len().min(s.len() + 1))
        .rev()
        .find(|&l| s.is_char_boundary(s.len() - l) && marker.starts_with(&s[s.len() - l..]))
        .unwrap_or(0)
}

impl Splitter {
    /// `opened`: the prompt already opened the reasoning (a template that ends its generation
    /// prompt with the start marker), so the output starts inside it.
    pub fn new(start: &str, end: &str, opened: bool) -> Splitter {
        Splitter {
            start: start.into(),
            end: end.into(),
            state: if opened {
                State::Reasoning
            } else {
                State::Start
            },
            held: String::new(),
        }
    }

    /// Splits `text`, the next delta of the output, onto `reasoning` and `content`.
    pub fn push(&mut self, text: &str, reasoning: &mut String, content: &mut String) {
        self.held.push_str(text);
        loop {
            match self.state {
                State::Start => {
                    let t = self.held.trim_start();
                    if let Some(rest) = t.strip_prefix(self.start.as_str()) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if self.start.starts_with(t) {
                        return; // Could still become the start marker.
                    } else {
                        self.state = State::Content { trim: false };
                    }
                }
                State::Reasoning => match self.held.find(self.end.as_str()) {
                    Some(i) => {
                        reasoning.push_str(&self.held[..i]);
                        self.held.drain(..i + self.end.len());
                        self.state = State::Content { trim: true };
                    }
                    None => {
                        let keep = partial_suffix(&self.held, &self.end);
                        let out = self.held.len() - keep;
                        reasoning.push_str(&self.held[..out]);
                        self.held.drain(..out);
                        return;
                    }
                },
                State::Content { trim } => {
                    let t = if trim {
                        self.held.trim_start()
                    } else {
                        &self.held
                    };
                    if !t.is_empty() {
                        content.push_str(t);
                        self.state = State::Content { trim: false };
                    }
                    self.held.clear();
                    return;
                }
            }
        }
    }

    /// The end of the output: what is held back goes out (an unterminated reasoning stays
    /// reasoning).
    pub fn finish(&mut self, reasoning: &mut String, content: &mut String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => reasoning.push_str(&held),
            State::Start | State::Content { trim: false } => content.push_str(&held),
            State::Content { trim: true } => content.push_str(held.trim_start()),
        }
    }

    /// Whether the output is inside the reasoning now.
    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `parts` fed as deltas; returns (reasoning, content) and checks that every split
    /// point gives the same result as the whole text at once.
    fn split(parts: &[&str], opened: bool) -> (String, String) {
        let (mut r, mut c) = (String::new(), String::new());
        let mut s = Splitter::new("<think>", "</think>", opened);
        for p in parts {
            s.push(p, &mut r, &mut c);
        }
        s.finish(&mut r, &mut c);
        let whole = parts.concat();
        for cut in 0..=whole.len() {
            if !whole.is_char_boundary(cut) {
                continue;
            }
            let (mut r2, mut c2) = (String::new(), String::new());
            let mut s = Splitter::new("<think>", "</think>", opened);
            s.push(&whole[..cut], &mut r2, &mut c2);
            s.push(&whole[cut..], &mut r2, &mut c2);
            s.finish(&mut r2, &mut c2);
            assert_eq!((&r2, &c2), (&r, &c), "cut at {cut} of {whole:?}");
        }
        (r, c)
    }

    #[test]
    fn splits_reasoning_from_content_across_deltas() {
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            split(
                &["Let me ", "think.</th", "ink>\n\nThe answer", " is 4."],
                true
            ),
            s("Let me think.", "The answer is 4.")
        );
        // The output opens the reasoning itself.
        assert_eq!(
            split(&["<thi", "nk>hmm</think>", " ok"], false),
            s("hmm", "ok")
        );
        // No reasoning at all; a "<" that turns out not to be the marker.
        assert_eq!(split(&["<b>bold</b>"], false), s("", "<b>bold</b>"));
        assert_eq!(split(&["plain ", "text"], false), s("", "plain text"));
        // Unterminated reasoning stays reasoning; a partial end marker at the end is flushed.
        assert_eq!(
            split(&["still thinking </thi"], true),
            s("still thinking </thi", "")
        );
        // Non-ASCII text next to the markers.
        assert_eq!(split(&["é</think>ü"], true), s("é", "ü"));
    }
}
