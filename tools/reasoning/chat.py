"""The chat format of the tiny reasoning model: one place for the template and the rendering.

`TEMPLATE` is the Jinja chat template that tokenizer.py writes into tokenizer_config.json
(ChatML as in Nemotron 3 Nano: a system turn only when one is given, the generation prompt
opens the reasoning with `<think>\\n`, or writes an empty `<think></think>\\n` when
`enable_thinking` is false). It has no literal text between its tags (every piece of output
is a string expression), so it renders the same under Python's jinja2 (with or without
HF's trim_blocks / lstrip_blocks) and under minijinja (the Rust crate's defaults).

`render_messages` is the same template written in Python; problems.py renders every training
document with it, and check.py compares it with the Jinja template under jinja2 and minijinja.
Standard library only.
"""

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
THINK = "<think>"
END_THINK = "</think>"

# Keep in sync with render_messages / generation_prompt below (check.py verifies it).
TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{{- '<|im_start|>' }}{{ message['role'] }}{{ '\\n' }}"
    "{{ message['content'] }}{{ '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}\n"
    "{{- '<|im_start|>assistant\\n<think></think>\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endif -%}\n"
)

MODES = ("think", "no_think", "truncated")


def generation_prompt(enable_thinking=True):
    """What the template appends for add_generation_prompt=True."""
    if enable_thinking:
        return f"{IM_START}assistant\n{THINK}\n"
    return f"{IM_START}assistant\n{THINK}{END_THINK}\n"


def render_messages(messages, add_generation_prompt=False, enable_thinking=True):
    """The template, in Python: `messages` is a list of {"role", "content"} dicts."""
    out = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        out.append(generation_prompt(enable_thinking))
    return "".join(out)


def assistant_content(think, answer, mode):
    """The assistant message of a training document ('truncated': `think` is already cut)."""
    if mode in ("think", "truncated"):
        return f"{THINK}\n{think}\n{END_THINK}\n{answer}"
    if mode == "no_think":
        return f"{THINK}{END_THINK}\n{answer}"
    raise ValueError(f"unknown mode {mode!r}")


def prompt_text(prompt, enable_thinking=True, system=None):
    """The prompt a model is given at evaluation: the conversation plus the generation prompt."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": prompt})
    return render_messages(msgs, True, enable_thinking)


def completion(think, answer, mode):
    """What the model writes after prompt_text(prompt, mode != 'no_think')."""
    if mode == "no_think":
        return f"{answer}{IM_END}\n"
    return f"{think}\n{END_THINK}\n{answer}{IM_END}\n"


def render(prompt, think, answer, mode="think"):
    """One training document: the template rendering [user, assistant], no generation prompt.

    Equal to prompt_text(prompt, mode != 'no_think') + completion(think, answer, mode).
    """
    return render_messages(
        [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": assistant_content(think, answer, mode)},
        ]
    )
