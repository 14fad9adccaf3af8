//! Tokenizers: HF `tokenizer.json` as is, or a byte-level BPE rebuilt from GGUF metadata
//! (`tokenizer.ggml.*`) with the pre-tokenizer llama.cpp uses for the named `pre` type.

use crate::error::{Error, Result};
use crate::formats::gguf::Value;
use crate::model::{Format, Model};
use std::collections::BTreeMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

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
            Format::Gguf => {
                let meta = m
                    .meta
                    .gguf
                    .as_ref()
                    .ok_or_else(|| Error::Tokenizer("GGUF metadata not kept".into()))?;
                from_gguf(meta)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", m.meta.path.display())))?
            }
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

fn arr<'a>(meta: &'a BTreeMap<String, Value>, k: &str) -> std::result::Result<&'a [Value], String> {
    meta.get(k)
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("metadata {k} is missing"))
}

fn from_gguf(meta: &BTreeMap<String, Value>) -> std::result::Result<tokenizers::Tokenizer, String> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        ));
    }
    let tokens = arr(meta, "tokenizer.ggml.tokens")?;
    let merges = arr(meta, "tokenizer.ggml.merges").unwrap_or(&[]);
    let types = arr(meta, "tokenizer.ggml.token_type").unwrap_or(&[]);
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    let mut specials = vec![];
    for (i, t) in tokens.iter().enumerate() {
        let s = t
            .as_str()
            .ok_or("tokenizer.ggml.tokens holds a non-string")?;
        vocab.insert(s.to_string(), i as u32);
        // 3 = control, 4 = user-defined: matched as whole tokens in text.
        if let Some(ty) = types.get(i).and_then(|v| v.as_u64())
            && (ty == 3 || ty == 4)
        {
            specials.push(AddedToken::from(s.to_string(), ty == 3));
        }
    }
    let mut mv = Vec::with_capacity(merges.len());
    for m in merges {
        let s = m
            .as_str()
            .ok_or("tokenizer.ggml.merges holds a non-string")?;
        let (a, b) = s
            .split_once(' ')
            .ok_or_else(|| format!("merge {s:?} is not two tokens"))?;
        // Like llama.cpp, ignore merges of tokens the vocabulary lacks (they can never apply).
        if vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        {
            mv.push((a.to_string(), b.to_string()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, mv)
        .build()
        .map_err(|e| format!("BPE: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre = meta
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.add_special_tokens(specials)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(tok)
}

/// llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), as HF pre-tokenizers.
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let byte_level = |regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
    let split = |re: &str| -> std::result::Result<PreTokenizerWrapper, String> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| e.to_string())?,
        ))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "" => byte_level(true),
        // Single digits, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]))
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                split(
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                )?,
                byte_level(false),
            ]))
        }
        "qwen2" | "deepseek-r1-qwen" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            split(
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
            )?,
            byte_level(false),
        ])),
        other => {
            return Err(format!(
                "pre-tokenizer {other:?} is not supported yet (known: gpt2, smollm, llama-bpe, qwen2)"
            ));
        }
    })
}
