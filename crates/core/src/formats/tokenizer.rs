//! Tokenizer format conversion: a byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`),
//! GGUF tokenizer metadata from an HF `tokenizer.json`, and HF tokenizer files from GGUF metadata.

use super::gguf::Value;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// What tokenizer files carry besides the vocabulary.
pub struct Specials<'a> {
    pub bos: Option<u32>,
    pub eos: &'a [u32],
    pub add_bos: bool,
    pub chat_template: Option<&'a str>,
    pub context: usize,
}

fn arr<'a>(meta: &'a BTreeMap<String, Value>, k: &str) -> std::result::Result<&'a [Value], String> {
    meta.get(k)
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("metadata {k} is missing"))
}

/// A byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.*`), with the pre-tokenizer
/// llama.cpp uses for the named `pre` type.
pub fn from_gguf(
    meta: &BTreeMap<String, Value>,
) -> std::result::Result<tokenizers::Tokenizer, String> {
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

/// GGUF tokenizer metadata (`tokenizer.ggml.*`, chat template) from an HF `tokenizer.json`
/// (byte-level BPE), the way llama.cpp's converter writes it.
pub fn gguf_meta_from_hf(dir: &Path, n_vocab: usize, s: &Specials) -> Result<Vec<(String, Value)>> {
    let p = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&p).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: {e} (needed to write the GGUF vocabulary)",
            p.display()
        ))
    })?;
    let j: serde_json::Value = super::json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("{}: invalid JSON: {e}", p.display())))?;
    let bad = |msg: &str| Error::Tokenizer(format!("{}: {msg}", p.display()));
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad("only byte-level BPE tokenizers can be written to GGUF"));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![5u32; n_vocab]; // unused until filled
    for (t, id) in vocab {
        if let Some(i) = id.as_u64().map(|x| x as usize).filter(|&i| i < n_vocab) {
            tokens[i] = Some(t.clone());
            types[i] = 1;
        }
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(i), Some(c)) = (a["id"].as_u64().map(|x| x as usize), a["content"].as_str())
            && i < n_vocab
        {
            tokens[i] = Some(c.to_string());
            types[i] = if a["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
        }
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| match x {
            serde_json::Value::String(s) => Some(Value::Str(s.clone())),
            serde_json::Value::Array(a) => Some(Value::Str(format!(
                "{} {}",
                a.first()?.as_str()?,
                a.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    let pre = detect_pre(&j["pre_tokenizer"]).ok_or_else(|| bad("pre-tokenizer not recognised (known: gpt2 byte-level, smollm digits + byte-level, llama-bpe, qwen2)"))?;
    let mut v = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::Str("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::Str(pre.into())),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(
                tokens
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| Value::Str(t.unwrap_or_else(|| format!("[PAD{i}]"))))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(s.add_bos),
        ),
    ];
    if let Some(b) = s.bos {
        v.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = s.eos.first() {
        v.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = s.chat_template {
        v.push(("tokenizer.chat_template".into(), Value::Str(t.into())));
    }
    Ok(v)
}

fn detect_pre(p: &serde_json::Value) -> Option<&'static str> {
    let ty = p["type"].as_str()?;
    match ty {
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let list = p["pretokenizers"].as_array()?;
            let types: Vec<&str> = list.iter().filter_map(|x| x["type"].as_str()).collect();
            if types == ["Digits", "ByteLevel"]
                && list[0]["individual_digits"].as_bool() == Some(true)
            {
                return Some("smollm");
            }
            if types == ["Split", "ByteLevel"] {
                let re = list[0]["pattern"]["Regex"].as_str()?;
                if re.contains(r"\p{N}{1,3}") {
                    return Some("llama-bpe");
                }
                if re.contains("'[sS]") {
                    return Some("qwen2");
                }
            }
            None
        }
        _ => None,
    }
}

/// HF tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json) for a
/// model whose tokenizer lives in GGUF metadata.
pub fn hf_files_from_gguf(
    meta: &BTreeMap<String, Value>,
    s: &Specials,
) -> Result<Vec<(&'static str, String)>> {
    let tok = from_gguf(meta).map_err(Error::Tokenizer)?;
    let json = tok
        .to_string(true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i));
    let mut cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": s.add_bos,
        "bos_token": name(s.bos),
        "eos_token": name(s.eos.first().copied()),
        "model_max_length": s.context,
        "clean_up_tokenization_spaces": false,
    });
    if let Some(t) = s.chat_template {
        cfg["chat_template"] = t.into();
    }
    let gen_cfg = serde_json::json!({"bos_token_id": s.bos, "eos_token_id": s.eos});
    Ok(vec![
        ("tokenizer.json", json),
        (
            "tokenizer_config.json",
            serde_json::to_string_pretty(&cfg).unwrap(),
        ),
        (
            "generation_config.json",
            serde_json::to_string_pretty(&gen_cfg).unwrap(),
        ),
    ])
}
