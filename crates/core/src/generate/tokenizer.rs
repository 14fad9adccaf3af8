//! Tokenizers: HF `tokenizer.json` as is, or a byte-level BPE rebuilt from GGUF metadata
//! ([`formats::tokenizer::from_gguf`](crate::formats::tokenizer::from_gguf)).

use crate::error::{Error, Result};
use crate::formats::tokenizer::from_gguf;
use crate::model::{Format, Model};

pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub add_bos: bool,
    /// End-of-generation ids (EOS and end-of-turn tokens).
    pub eos: Vec<u32>,
}

impl Tokenizer {
    pub fn for_model(m: &Model) -> Result<Tokenizer> {
        let mut eos = m.meta.eos.clone();
        let inner = match m.meta.format {
            Format::Hf => {
                let p = m.meta.path.join("tokenizer.json");
                if !p.exists() {
                    return Err(Error::Tokenizer(format!(
                        "{} is missing (needed to turn text into tokens)",
                        p.display()
                    )));
                }
                tokenizers::Tokenizer::from_file(&p)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))?
            }
            Format::Gguf => from_gguf(m.meta.gguf()?)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", m.meta.path.display())))?,
        };
        // End-of-turn tokens llama.cpp also treats as end of generation.
        for t in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end|>",
            "<end_of_turn>",
        ] {
            if let Some(id) = inner.token_to_id(t)
                && !eos.contains(&id)
            {
                eos.push(id);
            }
        }
        Ok(Tokenizer {
            inner,
            bos: m.meta.bos,
            add_bos: m.meta.add_bos,
            eos,
        })
    }

    /// Text to ids; `special` adds BOS when the model asks for it.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if special
            && self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }
}

/// A byte-level tokenizer for tests: token i is byte i (GPT-2's byte-to-character table, no
/// merges), then `specials` as added tokens from 256 on, the first of them EOS.
#[cfg(test)]
pub(crate) fn bytes_for_test(specials: &[&str]) -> Tokenizer {
    use tokenizers::decoders::byte_level::ByteLevel as Dec;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    let mut extra = 0;
    for b in 0..=255u32 {
        let c = if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        vocab.insert(char::from_u32(c).unwrap().to_string(), b);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .unwrap();
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_decoder(Some(Dec::default()));
    let added: Vec<_> = specials
        .iter()
        .map(|s| tokenizers::AddedToken::from(s.to_string(), true))
        .collect();
    inner.add_special_tokens(added).unwrap();
    Tokenizer {
        eos: specials.first().map(|_| 256).into_iter().collect(),
        inner,
        bos: None,
        add_bos: false,
    }
}
