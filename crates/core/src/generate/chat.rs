//! Chat templates (Jinja, as in HF tokenizer_config.json / GGUF tokenizer.chat_template),
//! rendered with minijinja plus Python string methods, and the one assembly of a chat prompt
//! ([`prompt`]) that every command uses.

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use minijinja::{Environment, Value, context};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub fn render(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
) -> Result<String> {
    render_with(
        template,
        messages,
        add_generation_prompt,
        bos,
        eos,
        &Default::default(),
    )
}

/// [`render`] with extra template variables (the server's `chat_template_kwargs`, such as
/// `enable_thinking`); the standard ones win over them.
pub fn render_with(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos: &str,
    eos: &str,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", template)
        .map_err(|e| Error::Input(format!("chat template: {e}")))?;
    let t = env.get_template("chat").unwrap();
    t.render(context! {
        messages => Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
        ..Value::from(minijinja::value::Serde(kwargs))
    })
    .map_err(|e| Error::Input(format!("chat template: {e}")))
}

/// The messages of one turn: an optional system message, then the user's.
pub fn messages(system: Option<&str>, user: &str) -> Vec<Message> {
    let mut m = Vec::with_capacity(2);
    if let Some(s) = system {
        m.push(Message {
            role: "system".into(),
            content: s.into(),
        });
    }
    m.push(Message {
        role: "user".into(),
        content: user.into(),
    });
    m
}

/// The text of a chat prompt: `template` (the model's) rendered for [`messages`] with the
/// generation prompt, and the tokenizer's BOS and first EOS as `bos_token` / `eos_token`.
pub fn prompt_text(
    template: Option<&str>,
    tok: &Tokenizer,
    system: Option<&str>,
    user: &str,
) -> Result<String> {
    prompt_text_with(template, tok, system, user, &Default::default())
}

/// [`prompt_text`] with extra template variables (`enable_thinking`).
pub fn prompt_text_with(
    template: Option<&str>,
    tok: &Tokenizer,
    system: Option<&str>,
    user: &str,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let tpl =
        template.ok_or_else(|| Error::Input("--chat: the model has no chat template".into()))?;
    conversation_text(tpl, tok, &messages(system, user), kwargs)
}

/// The text of a conversation: `template` rendered for `messages` with the generation prompt,
/// `kwargs` and the tokenizer's BOS and first EOS as `bos_token` / `eos_token`.
pub fn conversation_text(
    template: &str,
    tok: &Tokenizer,
    messages: &[Message],
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    let name = |id: Option<u32>| {
        id.and_then(|i| tok.inner.id_to_token(i))
            .unwrap_or_default()
    };
    let bos = name(tok.bos);
    let eos = name(tok.eos.first().copied());
    render_with(template, messages, true, &bos, &eos, kwargs)
}

/// The tokens of a chat prompt ([`prompt_text`]), with BOS once ([`encode`]).
pub fn prompt(
    template: Option<&str>,
    tok: &Tokenizer,
    system: Option<&str>,
    user: &str,
) -> Result<Vec<u32>> {
    encode(tok, &prompt_text(template, tok, system, user)?)
}

/// The tokens of a rendered chat prompt, with BOS once: added when the model asks for it,
/// unless the template already wrote it.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let has_bos = tok
        .bos
        .and_then(|b| tok.inner.id_to_token(b))
        .is_some_and(|b| !b.is_empty() && text.starts_with(&b));
    tok.encode(text, !has_bos)
}

#[cfg(test)]
mod tests {
    use super::super::tokenizer::bytes_for_test;
    use super::*;

    #[test]
    fn prompt_has_bos_once_and_the_special_names() {
        let mut tok = bytes_for_test(&["<eos>", "<s>"]);
        tok.bos = Some(257);
        tok.add_bos = true;
        let turns = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        // The template writes BOS: not added again.
        let with = format!("{{{{ bos_token }}}}{turns}");
        let text = prompt_text(Some(&with), &tok, Some("S"), "U").unwrap();
        assert_eq!(text, "<s>[system]S<eos>[user]U<eos>[assistant]");
        let ids = prompt(Some(&with), &tok, Some("S"), "U").unwrap();
        assert_eq!(ids, tok.encode(&text, false).unwrap());
        assert_eq!(ids.iter().filter(|&&t| t == 257).count(), 1);
        // It does not: added, as the model asks.
        let ids = prompt(Some(turns), &tok, None, "U").unwrap();
        assert_eq!(ids[0], 257);
        assert_eq!(tok.decode(&ids).unwrap(), "<s>[user]U<eos>[assistant]");
        // Template errors name the template.
        let e = prompt(
            Some("{{ raise_exception('no system role') }}"),
            &tok,
            None,
            "U",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("chat template") && e.contains("no system role"),
            "{e}"
        );
    }
}
