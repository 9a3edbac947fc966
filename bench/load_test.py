"""Load test of `loratune serve` (issue 7 acceptance; never run by CI): N concurrent streaming clients for a fixed
time against the embedded SmolLM2-135M-Instruct on the CPU; reports requests/s, p50/p99 latency, time to first
token, and failed requests, as a Markdown table, a JSON file and a latency/TTFT histogram PNG.

    python bench/load_test.py                                   # 16 clients, 60 s, a fresh server subprocess
    python bench/load_test.py --clients 16 --seconds 60 --max-tokens 64 --max-batch 16
    python bench/load_test.py --url http://127.0.0.1:8000 --model NAME [--api-key KEY]   # an already running server

The server runs in its own process (`python -m loratune.cli serve ...`), as a user would start it, so the
clients (asyncio + httpx, in this process) do not compete with it for the GIL. Every client sends one streaming
chat request after another (GSM8K questions from data/gsm8k); a request fails if the status is not 200, an error
event arrives, or the stream ends without `data: [DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from serve_process import start_serve

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "data" / "gsm8k" / "train.head400.jsonl"


def questions() -> list[str]:
    return [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> dict:
    start = time.perf_counter()
    first = None
    chunks = 0
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False, "error": event["error"]["message"]}
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not done:
        return {"ok": False, "error": "stream ended without [DONE]"}
    return {"ok": True, "latency_s": end - start, "ttft_s": (first or end) - start, "chunks": chunks,
            "start": start, "end": end}


async def client_loop(i: int, client: httpx.AsyncClient, args: argparse.Namespace, deadline: float,
                      prompts: list[str], results: list[dict]) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    n = i
    while time.perf_counter() < deadline:
        body = {"model": args.model, "stream": True, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": prompts[n % len(prompts)]}]}
        results.append(await one_request(client, args.url, body, headers))
        n += args.clients


async def run_load(args: argparse.Namespace) -> tuple[list[dict], float]:
    prompts = questions()
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(*(client_loop(i, client, args, deadline, prompts, results) for i in range(args.clients)))
        wall = time.perf_counter() - start
    return results, wall


def start_server(args: argparse.Namespace) -> subprocess.Popen:
    proc, args.url = start_serve(args.base, [
        "--model-name", args.model, "--max-batch", str(args.max_batch), "--max-queue", str(max(64, 2 * args.clients)),
        "--device", "cpu", "--threads", str(args.threads)])
    return proc


def report(results: list[dict], wall: float, args: argparse.Namespace, health: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok]
    chunks = sum(r["chunks"] for r in ok)
    summary = {
        "clients": args.clients, "seconds": round(wall, 1), "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "model": args.base, "requests_ok": len(ok), "requests_failed": len(failed),
        "requests_per_s": round(len(ok) / wall, 3), "stream_chunks_per_s": round(chunks / wall, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
        "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "ttft_mean_s": round(statistics.mean(ttfts), 3) if ttfts else None,
        "mean_batch_size": health.get("mean_batch_size"), "cpu_count": os.cpu_count(), "threads": args.threads,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "errors": sorted({r["error"] for r in failed})[:5],
    }
    rows = [("clients", args.clients), ("duration (s)", summary["seconds"]), ("requests ok / failed",
            f"{len(ok)} / {len(failed)}"), ("requests/s", summary["requests_per_s"]),
            ("streamed chunks/s (~tokens/s)", summary["stream_chunks_per_s"]),
            ("latency p50 / p99 (s)", f"{summary['latency_p50_s']} / {summary['latency_p99_s']}"),
            ("time to first token p50 / p99 (s)", f"{summary['ttft_p50_s']} / {summary['ttft_p99_s']}"),
            ("mean batch size", summary["mean_batch_size"]), ("load average at end", summary["load_average_at_end"])]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if failed:
        print("errors:", summary["errors"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--base", default="smollm2-135m-instruct", help="what the started server serves")
    parser.add_argument("--model", default="smollm2", help="model name the clients send")
    parser.add_argument("--url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--api-key", default=None)
    # One torch thread: on a shared 2-core machine, OpenMP threads waiting on each other at every op made a
    # 16-token answer take 12 s instead of 0.7 s (measured while other jobs were running).
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "load_test")
    args = parser.parse_args()
    proc = None if args.url else start_server(args)
    try:
        results, wall = asyncio.run(run_load(args))
        health = httpx.get(args.url + "/health", timeout=10).json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    summary = report(results, wall, args, health)
    sys.path.insert(0, str(REPO / "src"))
    from loratune.plots import histogram
    from loratune.runs import write_json_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "load_test.json", {"summary": summary, "requests": results})
    ok = [r for r in results if r["ok"]]
    if ok:
        histogram([round(r["latency_s"] * 1000) for r in ok], args.out / "latency_ms.png",
                  title=f"{args.clients} streaming clients, {summary['seconds']} s: request latency",
                  xlabel="latency (ms)", marks={"p50": summary["latency_p50_s"] * 1000,
                                                "p99": summary["latency_p99_s"] * 1000})
        histogram([round(r["ttft_s"] * 1000) for r in ok], args.out / "ttft_ms.png",
                  title=f"{args.clients} streaming clients: time to first token", xlabel="TTFT (ms)",
                  marks={"p50": summary["ttft_p50_s"] * 1000, "p99": summary["ttft_p99_s"] * 1000})
    print(f"wrote {args.out}/load_test.json, latency_ms.png, ttft_ms.png")
    if summary["requests_failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
