"""The server, through the official `openai` client (run by tests/server.rs).

Environment: ELASTICA_URL (the main server: elastic SmolLM2 `smol` with budgets full, 0.75, 0.5,
a chat template that opens <think>, an API key, a default draft 0.5), ELASTICA_TINY_URL (a server
with one slot and a queue of one), ELASTICA_API_KEY, ELASTICA_BIN, ELASTICA_MODEL,
ELASTICA_TEMPLATE. Exits non-zero on the first failed check.
"""

import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import threading
import time

import openai

try:  # the HTTP client the openai client brings (httpx2 in openai 3, httpx before)
    import httpx2 as httpx
except ImportError:
    import httpx

URL = os.environ["ELASTICA_URL"]
TINY = os.environ["ELASTICA_TINY_URL"]
KEY = os.environ["ELASTICA_API_KEY"]
BIN = os.environ["ELASTICA_BIN"]
MODEL = os.environ["ELASTICA_MODEL"]
TEMPLATE = os.environ["ELASTICA_TEMPLATE"]
END = "</think>"

client = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=300)
http = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", flush=True)
        sys.exit(1)


T0 = time.time()


def step(name):
    print(f"- [{time.time() - T0:6.1f} s] {name}", flush=True)


def run(*args):
    """`elastica run ... --json` (the single-sequence reference)."""
    o = subprocess.run([BIN, "-t", "1", "run", MODEL, *args, "--json"], capture_output=True, text=True)
    check(o.returncode == 0, f"elastica run {args}: {o.stderr}")
    return json.loads(o.stdout)


def split(text, opened=True):
    """The reasoning split of a raw output, as the server must do it."""
    if not opened:
        return None, text
    if END in text:
        r, c = text.split(END, 1)
        return r, c.lstrip()
    return text, ""


def metrics():
    t = http.get("/metrics").text
    out = {}
    for line in t.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def status_of(fn):
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e
    return 200, None


USER = "What is the capital of France? Answer in one sentence."
PROMPTS = [
    "The quick brown fox",
    "In 1905, Albert Einstein",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "The largest planet in the solar system",
    "To make a cup of tea,",
    "Once upon a time, in a small village,",
]

# --- models -------------------------------------------------------------------------------------
step("models: one id per manifest budget")
ids = [m.id for m in client.models.list().data]
check(ids[0] == "smol" and {"smol:full", "smol:0.75", "smol:0.5"} <= set(ids), f"model ids {ids}")

# --- completions: greedy outputs equal `elastica run`, budgets by id and by field --------------
step("completions: greedy output equals elastica run, at every budget, by id and by field")
for budget in ["full", "0.75", "0.5"]:
    ref = run("-p", PROMPTS[0], "-n", "24", "--budget", budget)
    r = client.completions.create(model=f"smol:{budget}", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    check(r.choices[0].text == ref["text"], f"completion at {budget}: {r.choices[0].text!r} != {ref['text']!r}")
    check(r.usage.completion_tokens == len(ref["tokens"]), f"usage at {budget}: {r.usage}")
    check(r.usage.prompt_tokens == ref["prompt_tokens"], f"prompt tokens at {budget}: {r.usage}")
    r2 = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                   extra_body={"budget": budget})
    check(r2.choices[0].text == ref["text"], f"budget by field {budget}")
    # Streaming gives the same text, then the usage chunk.
    chunks = list(client.completions.create(model=f"smol:{budget}", prompt=PROMPTS[0], max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    check(text == ref["text"], f"streamed completion at {budget}: {text!r}")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(ref["tokens"]),
          f"usage chunk at {budget}: {chunks[-1]}")
check(ref["text"] != run("-p", PROMPTS[0], "-n", "24")["text"], "budgets 0.5 and full answer alike")

# --- chat: the reasoning split, streaming and not ---------------------------------------------
step("chat: reasoning split out of content, streaming and not; equals elastica run --chat")
ref = run("--chat", "--chat-template", TEMPLATE, "-p", USER, "-n", "40")
want_r, want_c = split(ref["text"])
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": USER}],
                                   max_tokens=40, temperature=0)
m = r.choices[0].message
got_r = getattr(m, "reasoning_content", None)
check((got_r or "", m.content or "") == (want_r, want_c), f"chat split {got_r!r} {m.content!r} vs {ref['text']!r}")
check(getattr(m, "reasoning", None) == got_r, "reasoning and reasoning_content differ")
stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": USER}],
                                        max_tokens=40, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
sr, sc, last = "", "", None
for c in stream:
    last = c
    if c.choices:
        d = c.choices[0].delta
        sr += getattr(d, "reasoning_content", None) or ""
        sc += d.content or ""
check((sr, sc) == (want_r, want_c), f"streamed split {sr!r} {sc!r}")
check(last.usage.completion_tokens == len(ref["tokens"]), f"stream usage {last.usage}")

step("chat: enable_thinking false (chat_template_kwargs) gives content only; a thinking cap has nothing to cap")
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": USER}], max_tokens=16,
                                   temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                              "thinking_token_budget": 2})
check(r.choices[0].message.content and not getattr(r.choices[0].message, "reasoning_content", None)
      and r.usage.completion_tokens_details.reasoning_tokens == 0 and END not in r.choices[0].message.content,
      f"enable_thinking false: {r.choices[0].message} {r.usage}")

# --- thinking_token_budget, think and answer budgets -------------------------------------------
step("thinking_token_budget caps the reasoning; equals elastica run --thinking-tokens")
# ignore_eos: the cap is what is tested, whatever the model's first token (this elastic SmolLM2 may
# end at once after <think>, and an empty reply would test nothing).
ref = run("--chat", "--chat-template", TEMPLATE, "-p", USER, "-n", "30", "--think-budget", "full",
          "--thinking-tokens", "6", "--ignore-eos")
r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": USER}], max_tokens=30,
                                   temperature=0, extra_body={"thinking_token_budget": 6, "ignore_eos": True})
m = r.choices[0].message
want_r, want_c = split(ref["text"])
check((m.reasoning_content, m.content) == (want_r, want_c), f"capped split {m} vs {ref['text']!r}")
check(r.usage.completion_tokens_details.reasoning_tokens >= 6, f"reasoning tokens {r.usage}")
check(ref["phases"][0]["tokens"] == r.usage.completion_tokens_details.reasoning_tokens,
      f"reasoning tokens {r.usage} vs run's phases {ref['phases']}")

step("think at 0.5, answer at full: equals elastica run --think-budget 0.5; timings per phase")
for handoff in ["shared", "reprefill"]:
    ref = run("--chat", "--chat-template", TEMPLATE, "-p", USER, "-n", "30", "--think-budget", "0.5",
              "--answer-budget", "full", "--thinking-tokens", "6", "--handoff", handoff)
    r = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": USER}], max_tokens=30,
                                       temperature=0, extra_body={"think_budget": "0.5", "answer_budget": "full",
                                                                  "thinking_token_budget": 6, "handoff": handoff})
    m = r.choices[0].message
    check((m.reasoning_content, m.content) == split(ref["text"]), f"{handoff}: {m} vs {ref['text']!r}")
    phases = r.model_extra["timings"]["phases"]
    check([p["budget"] for p in phases] == ["0.5", "full"], f"phases {phases}")
    check([p["tokens"] for p in phases] == [q["tokens"] for q in ref["phases"]], f"{phases} vs {ref['phases']}")

# --- speculative decoding ----------------------------------------------------------------------
step("speculate: the server's default draft 0.5 and a request's own; greedy output unchanged")
before = metrics()
ref = run("-p", PROMPTS[1], "-n", "24")
for extra in [{}, {"speculate": {"draft": "0.75", "k": 2}}, {"speculate": False}]:
    r = client.completions.create(model="smol", prompt=PROMPTS[1], max_tokens=24, temperature=0, extra_body=extra)
    check(r.choices[0].text == ref["text"], f"speculative {extra}: {r.choices[0].text!r}")
after = metrics()
check(after["elastica:spec_decode_num_drafts_total"] > before["elastica:spec_decode_num_drafts_total"], "no drafts")
check(after["elastica:spec_decode_num_accepted_tokens_total"] > before["elastica:spec_decode_num_accepted_tokens_total"],
      "no accepted tokens")
check('elastica:spec_decode_num_accepted_tokens_per_pos{position="0"}' in after, "per-position counter")

# --- logprobs, n, seed -------------------------------------------------------------------------
step("logprobs: one entry per token, greedy picks the top alternative")
r = client.chat.completions.create(model="smol:0.75", messages=[{"role": "user", "content": USER}], max_tokens=8,
                                   temperature=0, logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check(len(lp) == r.usage.completion_tokens, f"{len(lp)} logprobs for {r.usage.completion_tokens} tokens")
for e in lp:
    check(len(e.top_logprobs) == 3 and e.logprob <= 0, f"logprob entry {e}")
    check(e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6, f"greedy {e}")
    check(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob, "sorted")
r = client.completions.create(model="smol", prompt=PROMPTS[2], max_tokens=6, temperature=0, logprobs=2)
check(len(r.choices[0].logprobs.tokens) == 6 and len(r.choices[0].logprobs.top_logprobs[0]) == 2,
      f"completion logprobs {r.choices[0].logprobs}")

step("n and seed: n choices; the same seed samples the same text")
kw = dict(model="smol", prompt=PROMPTS[3], max_tokens=12, temperature=0.9, seed=1234, n=3)
a, b = client.completions.create(**kw), client.completions.create(**kw)
check(len(a.choices) == 3 and [c.index for c in a.choices] == [0, 1, 2], f"n=3: {a.choices}")
check([c.text for c in a.choices] == [c.text for c in b.choices], "same seed, different text")
check(len({c.text for c in a.choices}) > 1, f"3 samples alike: {[c.text for c in a.choices]}")
full = run("-p", PROMPTS[0], "-n", "24")["text"]
word = " " + full.split(" ")[4]  # a stop string in the middle of the greedy output
stop = client.completions.create(model="smol", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=["zzzz", word])
check(stop.choices[0].text == full.split(word)[0] and stop.choices[0].finish_reason == "stop",
      f"stop string {word!r}: {stop.choices[0]} vs {full!r}")

# --- control endpoint --------------------------------------------------------------------------
step("control: end_reasoning and set_budget on a running request")
m0 = metrics()
stream = client.chat.completions.create(model="smol:0.5", messages=[{"role": "user", "content": "Tell me a long story."}],
                                        max_tokens=120, temperature=0, stream=True,
                                        extra_body={"request_id": "story-1", "ignore_eos": True})
rid, reasoning, content, done = None, "", "", False
for c in stream:
    rid = c.id
    if not c.choices:
        continue
    d = c.choices[0].delta
    reasoning += getattr(d, "reasoning_content", None) or ""
    content += d.content or ""
    if reasoning and not done:
        check(rid == "story-1", f"request_id {rid}")
        x = http.post("/v1/chat/completions/control", json={"id": rid, "action": "set_budget", "budget": "full"})
        check(x.status_code == 200 and x.json()["budget"] == "full", f"set_budget: {x.status_code} {x.text}")
        x = http.post("/v1/chat/completions/control", json={"id": rid, "action": "end_reasoning"})
        check(x.status_code == 200, f"end_reasoning: {x.status_code} {x.text}")
        done = True
check(done and content, f"end_reasoning gave no answer: reasoning {reasoning!r} content {content!r}")
m1 = metrics()
for b in ["0.5", "full"]:
    k = f'elastica:generation_tokens_total{{budget="{b}"}}'
    check(m1.get(k, 0) > m0.get(k, 0), f"no tokens counted at {b}: {k}")
x = http.post("/v1/chat/completions/control", json={"id": "story-1", "action": "end_reasoning"})
check(x.status_code == 404 and "error" in x.json(), f"control after the end: {x.status_code} {x.text}")
x = http.post("/v1/chat/completions/control", json={"id": "x", "action": "dance"})
check(x.status_code == 400, f"bad action: {x.status_code}")
x = http.post("/v1/chat/completions/control", json={"id": "x"})
check(x.status_code == 400 and x.json()["error"]["param"] == "action", f"missing action: {x.text}")

# --- cancellation ------------------------------------------------------------------------------
def wait_cancelled(m0, what):
    """Waits until /metrics counts one more cancelled request than `m0` and none running."""
    key = 'elastica:request_success_total{outcome="cancelled"}'
    t0 = time.time()
    while True:
        m1 = metrics()
        if m1[key] > m0[key] and m1["elastica:num_requests_running"] == 0:
            return
        check(time.time() - t0 < 30, f"{what} was not cancelled: {m1}")
        time.sleep(0.1)


step("cancellation: a client that goes away frees its slot; /metrics shows it")
m0 = metrics()
with http.stream("POST", "/v1/completions", json={"model": "smol", "prompt": PROMPTS[4], "max_tokens": 400,
                                                  "ignore_eos": True, "stream": True}) as s:
    n = 0
    for line in s.iter_lines():
        n += line.startswith("data: {")
        if n >= 3:
            break
wait_cancelled(m0, "the stream's request")
step("cancellation: a non-streaming client that disconnects is cancelled too")
m0 = metrics()
try:
    httpx.post(URL + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": "smol", "prompt": PROMPTS[5], "max_tokens": 400, "ignore_eos": True}, timeout=0.5)
except httpx.TimeoutException:
    pass
wait_cancelled(m0, "the non-streaming request")

# --- refusals ----------------------------------------------------------------------------------
step("refusals: OpenAI error objects with the right status")
msgs = [{"role": "user", "content": "hi"}]
cases = [
    (400, "temperature", lambda: client.chat.completions.create(model="smol", messages=msgs, temperature=5)),
    (400, "budget", lambda: client.chat.completions.create(model="smol", messages=msgs, extra_body={"budget": "lots"})),
    (400, "budget", lambda: client.chat.completions.create(model="smol:0.5", messages=msgs, extra_body={"budget": "full"})),
    (400, "max_tokens", lambda: client.completions.create(model="smol", prompt="x", max_tokens=100000)),
    (400, "n", lambda: client.completions.create(model="smol", prompt="x", n=100)),
    (400, "messages", lambda: client.chat.completions.create(model="smol", messages=[])),
    (400, "handoff", lambda: client.chat.completions.create(model="smol", messages=msgs, extra_body={"handoff": "teleport", "think_budget": "0.5"})),
    (400, "think_budget", lambda: client.chat.completions.create(model="smol", messages=msgs, extra_body={
        "think_budget": "0.5", "chat_template_kwargs": {"enable_thinking": False}})),
    (400, "thinking_token_budget", lambda: client.chat.completions.create(model="smol", messages=msgs, extra_body={"thinking_token_budget": 0})),
    (400, "speculate", lambda: client.chat.completions.create(model="smol", messages=msgs, extra_body={"speculate": {"draft": "full", "k": 99}})),
    (400, "prompt", lambda: client.completions.create(model="smol", prompt="word " * 600)),
    (404, None, lambda: client.completions.create(model="gpt-5", prompt="x")),
    (404, None, lambda: client.completions.create(model="smol:nonsense", prompt="x")),
    (401, None, lambda: openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0).models.list()),
]
for want, param, fn in cases:
    got, e = status_of(fn)
    check(got == want, f"wanted {want}, got {got}: {e}")
    body = e.body if isinstance(e.body, dict) else {}
    check("message" in body and "type" in body, f"not an OpenAI error object: {e.body}")
    if param:
        check(param in (body.get("param") or "") or param in body["message"], f"the error names no {param}: {body}")
x = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * 70000 + b'"}')
check(x.status_code == 413 and x.json()["error"]["message"], f"large body: {x.status_code} {x.text[:200]}")

step("refusal: a full queue is 503 (one slot, queue of one)")
tiny = openai.OpenAI(base_url=TINY + "/v1", api_key="none", max_retries=0)
long = dict(model=tiny.models.list().data[0].id, prompt="hello", max_tokens=3000, extra_body={"ignore_eos": True})
first = tiny.completions.create(**long, stream=True)
next(iter(first))  # running: the one slot is taken
second = tiny.completions.create(**long, stream=True)  # waiting: the queue is full
got, e = status_of(lambda: tiny.completions.create(**long))
check(got in (429, 503), f"full queue: {got} {e}")
first.close()
second.close()

# --- fuzz --------------------------------------------------------------------------------------
step("fuzz: malformed bodies never get a 5xx, and the server stays up")
rng = random.Random(7)
# Mutations never touch the leading `"max_tokens": 1` (a duplicate key is refused), so a body
# that stays valid costs one token.
head = '{"max_tokens": 1, '
base = [
    head + '"model": "smol", "prompt": "hi", "logprobs": 2, "stop": ["a"]}',
    head + '"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 2, "budget": "0.5"}',
]
weird = [b"", b"null", b"[]", b"{}", b"\xff\xfe\x00", b'{"prompt": "\xc3\x28"}', b"{" * 5000, b'{"a":' * 100000,
         b'{"prompt": "x", "max_tokens": 1e999}', b'{"prompt": "x", "max_tokens": 18446744073709551616}',
         b'{"prompt": [[1, 2], [3]]}', b'{"prompt": [99999999]}', b'{"prompt": "x", "stop": [1, 2]}',
         b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
         b'{"messages": "hi"}', b'{"prompt": "x", "seed": -1, "max_tokens": 1}', b'{"prompt": "x", "top_k": -5}',
         b'{"prompt": "x", "logprobs": 21}', b'{"prompt": "x", "speculate": "0.5", "logprobs": 1, "max_tokens": 1}',
         b'{"prompt": "x", "budget": "hidden=-1"}', b'{"prompt": "x", "budget": "' + b"9" * 400 + b'"}',
         b'{"prompt": "x", "chat_template_kwargs": 5}', b'{"prompt": "x", "stream_options": []}']
bodies = list(weird)
for _ in range(300):
    b = bytearray(rng.choice(base).encode())
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randint(0, 3), rng.randrange(len(head), len(b))
        if op == 0:
            del b[i]
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif op == 2:
            b[i] = rng.choice(b'{}[]":,0123456789-e.tfn\\')
        else:
            b[i:i] = rng.choice([b"1e309", b"-99999999999999999999", b'"\\ud800"', b"[" * 50, b"null", b'{"x":{}}'])
    bodies.append(bytes(b))
def fuzz_post(path, b):
    # A keep-alive connection the server closed between two requests surfaces as a protocol error
    # on the next one (the client cannot tell it from a dropped request): the same body is sent
    # once more on a new connection, and must then get its answer. A server that drops the
    # connection on this body itself fails both times.
    try:
        return http.post(path, content=b, headers={"Content-Type": "application/json"})
    except httpx.RemoteProtocolError as e:
        print(f"  note: {path} {b[:60]!r}: {e}; retrying on a new connection", flush=True)
        with httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
            return c.post(path, content=b, headers={"Content-Type": "application/json"})


for path in ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions/control"]:
    for b in bodies:
        x = fuzz_post(path, b)
        check(x.status_code < 500, f"{path} {b[:80]!r}: {x.status_code} {x.text[:200]}")
        if x.status_code >= 400:
            check("error" in x.json(), f"{path} {b[:80]!r}: not an error object: {x.text[:200]}")
check(http.get("/health").status_code == 200, "the server is down after the fuzz")

# --- load: 64 concurrent clients ---------------------------------------------------------------
step("load: 64 concurrent clients, mixed budgets, streaming and not; outputs equal single-client ones")
budgets = ["full", "0.75", "0.5"]
# Every eighth request speculates with the server's default draft (0.5, in the full and 0.75
# budgets); the others turn it off.
jobs = [(PROMPTS[i % 8], budgets[i % 3], i % 2 == 1, i % 8 == 0) for i in range(64)]
refs = {}
for p, b, _, _ in jobs:
    if (p, b) not in refs:
        r = client.completions.create(model=f"smol:{b}", prompt=p, max_tokens=32, temperature=0,
                                       extra_body={"speculate": False})
        refs[(p, b)] = r.choices[0].text
m0 = metrics()


def one(job):
    p, b, streaming, spec = job
    t0 = time.time()
    c = openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=600)
    kw = dict(model=f"smol:{b}", prompt=p, max_tokens=32, temperature=0, extra_body={} if spec else {"speculate": False})
    if streaming:
        text = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True) if ch.choices)
    else:
        text = c.completions.create(**kw).choices[0].text
    return job, text, time.time() - t0


t0 = time.time()
with cf.ThreadPoolExecutor(64) as pool:
    results = list(pool.map(one, jobs))
wall = time.time() - t0
check(len(results) == 64, "lost requests")
for (p, b, streaming, _), text, _ in results:
    check(text == refs[(p, b)], f"load: {p!r} at {b} (stream {streaming}): {text!r} != {refs[(p, b)]!r}")
lat = sorted(r[2] for r in results)
m1 = metrics()
check(m1['elastica:request_success_total{outcome="finished"}'] - m0['elastica:request_success_total{outcome="finished"}'] == 64,
      "the finished counter did not count 64")
print(f"  load: 64 requests in {wall:.1f} s, latency p50 {lat[31]:.2f} s, p99 {lat[63]:.2f} s", flush=True)
print("all server checks passed", flush=True)
