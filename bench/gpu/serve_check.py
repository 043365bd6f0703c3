"""The server part of the GPU kit: `expo-serve serve` on the random pair with bit Δ, checked with
the openai client and timed with a short streaming load.

1. The pair is made on the device (bench/gpu/random_pair.py); θ_sft is written as a Hugging Face
   folder and Δ is built in the `bit` encoding with `expo_serve.delta.build.build_delta` (the code
   behind `expo-serve delta build`), both under --work.
2. `python -m expo_serve serve --sft ... --delta ...` starts on 127.0.0.1 (a free port).
3. The openai client asks a chat with `alpha` (plain and streamed) and checks the α the server
   says served it (the `expo` object and the `x-expo-alpha` header).
4. bench_serving's streaming clients send --requests chats (prompts of 63–231 tokens, max_tokens
   16–128, α over three arms, greedy, EOS ignored), --concurrency at a time: TTFT, ITL, tokens/s.
Each step appends a JSON row to --rows-out as it ends.

    python bench/gpu/serve_check.py --shape mistral-7b --device cuda --dtype bfloat16 --work /tmp/kit
    python bench/gpu/serve_check.py --shape tiny --device cpu --dtype float32 --work /tmp/kit   # dry
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "bench"), str(ROOT / "bench" / "gpu")]

from bench_serving import over_http, run_clients, summarize  # noqa: E402
from random_pair import make_pair, save_folder  # noqa: E402
from servers import start_expo  # noqa: E402
from workload import make_workload  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def emit(path: Path | None, row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(row) + "\n")


def prepare(args) -> tuple[Path, Path, float]:
    from expo_serve.delta.build import build_delta

    started = time.perf_counter()
    sft, aligned = make_pair(args.shape, args.device, DTYPES[args.dtype])
    sft_dir, delta_dir = args.work / "sft", args.work / "delta-bit"
    save_folder(sft, sft_dir)
    build_delta(sft, aligned, delta_dir, encoding="bit")
    return sft_dir, delta_dir, time.perf_counter() - started


def openai_chat(url: str, model: str) -> dict:
    """The openai client's chat with alpha, plain and streamed: which α did the server say it used?"""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=16,
                                                           temperature=0, extra_body={"alpha": 0.3})
    reply = raw.parse()
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
                                            extra_body={"alpha": 2.5})
    chunks = list(stream)
    streamed_alpha = (chunks[0].model_extra or {}).get("expo", {}).get("alpha")
    ok = ((reply.model_extra or {}).get("expo", {}).get("alpha") == 0.3 and raw.headers.get("x-expo-alpha") == "0.3"
          and streamed_alpha == 2.5 and reply.usage.completion_tokens == 16)
    return {"step": "openai", "ok": ok, "alpha_header": raw.headers.get("x-expo-alpha"),
            "expo": (reply.model_extra or {}).get("expo"), "streamed_alpha": streamed_alpha,
            "completion_tokens": reply.usage.completion_tokens, "text": reply.choices[0].message.content[:80]}


async def load(url: str, model: str, requests, concurrency: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        one = over_http(client, model)
        await run_clients(requests[:4], 4, one)  # warm-up
        wall, samples = await run_clients(requests, concurrency, one)
    expected = sum(r.max_tokens for r in requests)
    got = sum(s.tokens for s in samples)
    if got != expected:
        raise SystemExit(f"the load run streamed {got} tokens; its requests asked for {expected}")
    return summarize(wall, samples, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="mistral-7b", choices=("mistral-7b", "tiny"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--work", type=Path, required=True, help="folder for the pair and the server log")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--rows-out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    sft_dir, delta_dir, prepare_s = prepare(args)
    emit(args.rows_out, {"step": "prepare", "seconds": round(prepare_s, 1), "shape": args.shape, "encoding": "bit"})
    started = time.perf_counter()
    log = args.work / "server.log"
    server = start_expo("server", ["--sft", str(sft_dir), "--delta", str(delta_dir)], log, "--device", args.device,
                        "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency), "--max-model-len", "1024",
                        "--kv-cache-gib", str(args.kv_cache_gib), timeout_s=args.start_timeout)
    emit(args.rows_out, {"step": "start", "seconds": round(time.perf_counter() - started, 1), "url": server.url})
    try:
        emit(args.rows_out, openai_chat(server.url, server.model))
        from transformers import AutoTokenizer

        from expo_serve.demo.pair import load_preferences

        corpus = [row[key] for row in load_preferences() for key in ("chosen", "rejected")]
        requests = make_workload(AutoTokenizer.from_pretrained(sft_dir), args.requests, 0, corpus)
        figures = asyncio.run(load(server.url, server.model, requests, args.concurrency))
        emit(args.rows_out, {"step": "load", "requests": args.requests, "concurrency": args.concurrency,
                             "output_tokens": sum(r.max_tokens for r in requests), **figures})
    finally:
        server.stop()
        print(log.read_text()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
