//! Chat templates (Jinja, as in HF tokenizer_config.json / GGUF tokenizer.chat_template),
//! rendered with minijinja plus Python string methods.

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
    })
    .map_err(|e| Error::Input(format!("chat template: {e}")))
}
