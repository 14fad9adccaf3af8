#!/usr/bin/env python3
"""Closed-loop load generator for any OpenAI-compatible completions server.

C clients start together; each sends its requests one after another to POST /v1/completions with
streaming on, `temperature 0` and `ignore_eos` (so every request generates exactly --max-tokens
tokens), and reads the SSE stream. Per request it records the time to first token (first chunk
with non-empty text), the end-to-end latency and the completion tokens (from the usage chunk that
`stream_options.include_usage` asks for; when a server sends none, the count of text chunks, and
the report says so). A request that did not produce exactly --max-tokens tokens is a mismatch and
is reported as such (it still counts in the throughput).

Report: generated tok/s = all completion tokens / wall time of the whole run (first request sent
to last stream closed), requests/s, TTFT p50/p99, latency p50/p99, time per output token p50
((latency - TTFT) / (tokens - 1)), errors and mismatches. One JSON line on stdout (and in --json
OUT), one human line on stderr.

Usage:
  serve_load.py --url http://127.0.0.1:8080 --clients 16 --requests-per-client 4 [--max-tokens 128]
                [--prompt-file F] [--model ID | --model A,B,C | --all-models] [--json OUT]
                [--warmup N] [--strict]
  serve_load.py --url URL1,URL2,URL3 --model ID1,ID2,ID3 ...   (one model per server)

--prompt-file: prompts separated by blank lines (default: four built-in English paragraphs of
about 100 tokens each); client i uses prompt i mod k. --model with several ids (comma-separated,
or --all-models for every id of GET /v1/models) spreads the requests over them: request j of
client i goes to model (i + j) mod m. Several comma-separated URLs spread the requests over servers
the same way; with several URLs and several models, the k-th model is sent to the k-th URL (same
count). Needs httpx (the openai venv has it as httpx2; either works).
"""
import argparse
import asyncio
import json
import math
import os
import sys
import time

try:
    import httpx
except ImportError:  # openai >= 3 depends on the `httpx2` distribution instead
    import httpx2 as httpx

PROMPTS = [
    "The history of the lighthouse is a story of light, stone and patience. Long before electric "
    "lamps, keepers climbed narrow stairs every evening to trim wicks, polish brass and wind the "
    "clockwork that turned the great lenses. Storms tested both the towers and the people inside "
    "them, and many keepers kept careful logs of wind, weather and passing ships. Write a short "
    "account of one winter night in such a lighthouse, told by the keeper, describing",
    "Bread is one of the oldest prepared foods, and every region has its own way of making it. A "
    "simple loaf needs only flour, water, salt and yeast, yet the result depends on time, "
    "temperature and the hands that knead the dough. Bakers learn to judge a dough by its feel and "
    "smell rather than by a clock, and they adjust each batch to the weather of the day. Explain "
    "to a beginner, step by step, how to bake a first loaf at home, starting with",
    "A small town decided to build a community garden on an empty lot near the railway station. "
    "The volunteers had little money, a few borrowed tools and a great deal of enthusiasm. They "
    "tested the soil, drew plans on the back of old posters and argued for weeks about whether to "
    "plant vegetables, flowers or fruit trees. By the second summer the garden fed dozens of "
    "families and had become a meeting place for the whole neighbourhood. Describe how the project "
    "began, who",
    "Rivers shape the land they cross. Over thousands of years, water carves valleys, moves sand "
    "and gravel, and builds wide plains where crops can grow. People have always settled near "
    "rivers for water, food and transport, but floods remind them that a river is never fully "
    "tamed. Engineers now study how rivers change their course and how wetlands can slow the "
    "water during heavy rain. Summarise, for a school report, the main ways in which a river "
    "changes its landscape, and",
]


def pct(values, p):
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))
    return v[k]


async def one_request(client, url, body):
    """Send one streaming completion; return a dict describing what happened."""
    rec = {"url": url, "model": body.get("model"), "ttft": None, "latency": None, "tokens": None,
           "usage": False, "chunks": 0, "text_chunks": 0, "prompt_tokens": None,
           "finish_reason": None, "error": None}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode("utf-8", "replace")
                rec["error"] = f"HTTP {resp.status_code}: {raw[:300]}"
                rec["latency"] = time.perf_counter() - t0
                return rec
            done = False
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data:"):
                    continue  # "event:" / "id:" lines carry nothing we need
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec["error"] = f"bad SSE data: {data[:200]}"
                    break
                if "error" in chunk and not chunk.get("choices"):
                    rec["error"] = f"error event: {json.dumps(chunk)[:300]}"
                    break
                rec["chunks"] += 1
                for ch in chunk.get("choices") or []:
                    text = ch.get("text")
                    if text is None:  # tolerate chat-style deltas
                        text = (ch.get("delta") or {}).get("content")
                    if text:
                        rec["text_chunks"] += 1
                        if rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - t0
                    if ch.get("finish_reason"):
                        rec["finish_reason"] = ch["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    rec["usage"] = True
                    rec["tokens"] = usage.get("completion_tokens")
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
            if not done and rec["error"] is None:
                rec["error"] = "stream ended without data: [DONE]"
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    if rec["tokens"] is None:
        rec["tokens"] = rec["text_chunks"]
    return rec


async def run(args, prompts, targets):
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        def target(i, j):
            url, model = targets[(i + j) % len(targets)]
            b = {"prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                 "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                 "ignore_eos": True}
            if model:
                b["model"] = model
            return url, b

        for w in range(args.warmup * len(targets)):  # untimed, one at a time, each target once per round
            r = await one_request(client, *target(0, w))
            if r["error"]:
                print(f"serve_load: warmup request failed: {r['error']}", file=sys.stderr)

        per_client = args.requests_per_client

        async def client_loop(i):
            out = []
            for j in range(per_client):
                rec = await one_request(client, *target(i, j))
                rec["client"], rec["index"] = i, j
                out.append(rec)
            return out

        t0, c0 = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(client_loop(i) for i in range(args.clients)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return [r for rs in results for r in rs], wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080 (or several, comma-separated)")
    ap.add_argument("--clients", type=int, default=1, help="concurrent clients (default 1)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--requests-per-client", type=int, help="requests each client sends (default 4)")
    g.add_argument("--total", type=int, help="total requests, split evenly over the clients (rounded up)")
    ap.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request (default 128)")
    ap.add_argument("--prompt-file", help="prompts separated by blank lines (default: built-in)")
    mg = ap.add_mutually_exclusive_group()
    mg.add_argument("--model", help="model id, or comma-separated ids to spread the requests over")
    mg.add_argument("--all-models", action="store_true", help="spread the requests over every id of GET /v1/models")
    ap.add_argument("--warmup", type=int, default=0, help="untimed requests sent first, one at a time, N per target (default 0)")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout, seconds (default 600)")
    ap.add_argument("--label", help="free text copied into the JSON (e.g. the engine)")
    ap.add_argument("--json", dest="json_out", help="also write the JSON report to this file")
    ap.add_argument("--strict", action="store_true", help="exit 3 when any request failed or mismatched")
    args = ap.parse_args()

    if args.total is not None:
        args.requests_per_client = max(1, -(-args.total // args.clients))
    elif args.requests_per_client is None:
        args.requests_per_client = 4
    if args.clients < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        ap.error("--clients, the request count and --max-tokens must be positive")

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
        if not prompts:
            ap.error(f"no prompts in {args.prompt_file}")
    else:
        prompts = PROMPTS

    urls = [u.rstrip("/") for u in args.url.split(",") if u]
    models = []
    if args.all_models:
        r = httpx.get(urls[0] + "/v1/models", timeout=30.0)
        r.raise_for_status()
        models = [m["id"] for m in r.json()["data"]]
        if not models:
            sys.exit("serve_load: GET /v1/models listed no models")
    elif args.model:
        models = [m for m in args.model.split(",") if m]
    if len(urls) > 1 and len(models) > 1 and len(urls) != len(models):
        ap.error("with several URLs and several models, give as many of each")
    n = max(len(urls), len(models), 1)
    targets = [(urls[k % len(urls)], models[k % len(models)] if models else None) for k in range(n)]

    recs, wall, client_cpu = asyncio.run(run(args, prompts, targets))

    ok = [r for r in recs if not r["error"]]
    errors = [r for r in recs if r["error"]]
    mismatches = [r for r in ok if r["tokens"] != args.max_tokens]
    no_usage = [r for r in ok if not r["usage"]]
    no_text = [r for r in ok if r["ttft"] is None]
    tokens = sum(r["tokens"] or 0 for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    lat = [r["latency"] for r in ok]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
            if r["ttft"] is not None and (r["tokens"] or 0) > 1]
    per_model = {}
    for r in ok:
        key = (r["model"] or "") + (f" @ {r['url']}" if len(urls) > 1 else "")
        m = per_model.setdefault(key, {"requests": 0, "tokens": 0})
        m["requests"] += 1
        m["tokens"] += r["tokens"] or 0

    def ms(x):
        return None if x is None else round(x * 1000, 1)

    rep = {
        "label": args.label, "url": args.url, "clients": args.clients,
        "requests_per_client": args.requests_per_client, "requests": len(recs),
        "max_tokens": args.max_tokens, "prompts": len(prompts), "models": models,
        "ok": len(ok), "errors": len(errors), "mismatches": len(mismatches),
        "usage_missing": len(no_usage),
        "token_count_source": "usage" if not no_usage else
                              ("text chunks (no usage chunk)" if len(no_usage) == len(ok) else "mixed"),
        "completion_tokens": tokens,
        "prompt_tokens_mean": (round(sum(r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None)
                                     / max(1, sum(1 for r in ok if r["prompt_tokens"] is not None)), 1)
                               if any(r["prompt_tokens"] is not None for r in ok) else None),
        "wall_s": round(wall, 3), "client_cpu_s": round(client_cpu, 3),
        "client_cpu_total_s": round(sum(os.times()[:2]), 3),
        "tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "req_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
        "latency_p50_ms": ms(pct(lat, 50)), "latency_p99_ms": ms(pct(lat, 99)),
        "tpot_p50_ms": ms(pct(tpot, 50)),
        "per_model": per_model if len(per_model) > 1 else None,
        "no_text_requests": len(no_text),
        "error_samples": [{"client": r["client"], "index": r["index"], "model": r["model"], "error": r["error"]}
                          for r in errors[:5]],
        "mismatch_samples": [{"client": r["client"], "index": r["index"], "model": r["model"],
                              "tokens": r["tokens"], "source": "usage" if r["usage"] else "text chunks",
                              "text_chunks": r["text_chunks"], "finish_reason": r["finish_reason"]}
                             for r in mismatches[:5]],
    }
    line = json.dumps(rep)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")

    def f(x, unit=""):
        return "-" if x is None else f"{x:g}{unit}"
    human = (f"{args.label + ': ' if args.label else ''}{args.clients} clients x {args.requests_per_client} req, "
             f"{args.max_tokens} tok: {f(rep['tok_s'])} tok/s, {f(rep['req_s'])} req/s, "
             f"TTFT p50/p99 {f(rep['ttft_p50_ms'])}/{f(rep['ttft_p99_ms'])} ms, "
             f"latency p50/p99 {f(rep['latency_p50_ms'])}/{f(rep['latency_p99_ms'])} ms, "
             f"errors {len(errors)}, token mismatches {len(mismatches)}")
    if no_usage:
        human += f" ({len(no_usage)} requests without a usage chunk: tokens counted as text chunks)"
    print(human, file=sys.stderr)
    for r in errors[:3]:
        print(f"  error (client {r['client']} request {r['index']}): {r['error']}", file=sys.stderr)
    for r in mismatches[:3]:
        print(f"  mismatch (client {r['client']} request {r['index']}): {r['tokens']} tokens "
              f"({'usage' if r['usage'] else 'text chunks'}), finish_reason {r['finish_reason']}", file=sys.stderr)
    if not ok:
        sys.exit(2)
    if args.strict and (errors or mismatches):
        sys.exit(3)


if __name__ == "__main__":
    main()
