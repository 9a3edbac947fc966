"""Soak test of `loratune serve` (issue 8; never run by CI): 32 concurrent clients for 5 minutes against the embedded
SmolLM2-135M-Instruct on the CPU, mixing valid requests with invalid ones (negative max_tokens, invalid JSON, an
unknown model, a missing or wrong API key, a body over the size limit, a prompt over the token limit).

Pass criteria (the script exits 1 if any fails):
- zero 5xx responses and zero transport errors (timeouts, dropped connections);
- every valid request answered with 200 and a non-empty completion, every invalid one with its own 4xx;
- server memory flat: RSS growth between minute 1 and the end under 10%.

    python bench/soak_test.py                              # 32 clients, 300 s, a fresh server subprocess
    python bench/soak_test.py --clients 32 --seconds 300 --max-tokens 16

The server runs as its own process (`python -m loratune.cli serve ...`), as a user would start it; its RSS is
read from /proc every few seconds. Results: a Markdown table on stdout, runs/bench/soak/soak.json and rss.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from serve_process import start_serve

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "data" / "gsm8k" / "train.head400.jsonl"
KEY = "sk-soak-0123456789"


def questions() -> list[str]:
    return [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines() if line.strip()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the request mix: (kind, expected status, how to send it) -------------------------------------------------------------
def request_for(kind: str, prompt: str, args: argparse.Namespace) -> tuple[dict, bytes | None, int]:
    """(headers, raw body, expected status) for one request of `kind`."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def chat(**kw) -> bytes:
        body = {"model": args.model, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": prompt}], **kw}
        return json.dumps(body).encode()

    if kind == "valid":
        return auth, chat(), 200
    if kind == "valid_stream":
        return auth, chat(stream=True), 200
    if kind == "negative_max_tokens":
        return auth, chat(max_tokens=-5), 400
    if kind == "invalid_json":
        return auth, b'{"model": "smollm2", "messages": [', 400
    if kind == "unknown_model":
        return auth, chat(model="gpt-17"), 404
    if kind == "missing_key":
        return {"Content-Type": "application/json"}, chat(), 401
    if kind == "wrong_key":
        return {**auth, "Authorization": "Bearer sk-wrong"}, chat(), 401
    if kind == "huge_body":  # over the 1 MiB body limit
        return auth, chat(messages=[{"role": "user", "content": "x" * (1 << 20)}]), 413
    if kind == "huge_prompt":  # under the body limit, over the prompt-token limit
        return auth, chat(messages=[{"role": "user", "content": "seven " * 3000}]), 413
    raise ValueError(kind)


INVALID = ["negative_max_tokens", "invalid_json", "unknown_model", "missing_key", "wrong_key", "huge_body",
           "huge_prompt"]


async def one_request(client: httpx.AsyncClient, url: str, kind: str, prompt: str, args) -> dict:
    headers, body, expected = request_for(kind, prompt, args)
    start = time.perf_counter()
    try:
        response = await client.post(url + "/v1/chat/completions", content=body, headers=headers)
        text = response.text
    except httpx.HTTPError as e:
        return {"kind": kind, "status": None, "ok": False, "error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - start
    ok = response.status_code == expected
    if ok and kind == "valid":
        ok = bool(response.json()["choices"][0]["message"]["content"])
    if ok and kind == "valid_stream":
        ok = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
    if ok and expected >= 400:
        ok = "error" in response.json() and KEY not in text  # OpenAI's error shape; the key is never echoed
    return {"kind": kind, "status": response.status_code, "ok": ok, "latency_s": round(latency, 3),
            "error": None if ok else text[:200]}


async def client_loop(i: int, client: httpx.AsyncClient, args, deadline: float, prompts: list[str],
                      results: list[dict]) -> None:
    rng = random.Random(i)
    n = i
    while time.perf_counter() < deadline:
        # Half valid (a quarter of those streaming), half one of the invalid kinds.
        roll = rng.random()
        kind = ("valid_stream" if roll < 0.12 else "valid") if roll < 0.5 else rng.choice(INVALID)
        results.append(await one_request(client, args.url, kind, prompts[n % len(prompts)], args))
        n += args.clients


async def sample_rss(pid: int, start: float, deadline: float, samples: list[tuple[float, float]]) -> None:
    while time.perf_counter() < deadline:
        samples.append((round(time.perf_counter() - start, 1), round(rss_mib(pid), 1)))
        await asyncio.sleep(5)


async def run_soak(args, pid: int) -> tuple[list[dict], list[tuple[float, float]], float]:
    prompts = questions()
    results: list[dict] = []
    samples: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        start = time.perf_counter()
        deadline = start + args.seconds
        await asyncio.gather(sample_rss(pid, start, deadline, samples),
                             *(client_loop(i, client, args, deadline, prompts, results) for i in range(args.clients)))
        samples.append((round(time.perf_counter() - start, 1), round(rss_mib(pid), 1)))
        wall = time.perf_counter() - start
    return results, samples, wall


def start_server(args) -> subprocess.Popen:
    # One torch thread: on a shared 2-core machine OpenMP threads spinning against each other slow every op.
    proc, args.url = start_serve(args.base, [
        "--model-name", args.model, "--api-key", KEY, "--max-batch", str(args.max_batch),
        "--max-queue", str(max(64, 2 * args.clients)), "--max-prompt-tokens", "1024", "--device", "cpu"],
        env={"OMP_NUM_THREADS": str(args.threads)})
    return proc


def summarize(results: list[dict], samples: list[tuple[float, float]], wall: float, args) -> dict:
    statuses = Counter(str(r["status"]) for r in results)
    by_kind = Counter(r["kind"] for r in results)
    failed = [r for r in results if not r["ok"]]
    valid = [r for r in results if r["kind"].startswith("valid")]
    after_minute = [rss for t, rss in samples if t >= 60] or [samples[-1][1]]
    rss_start, rss_end = after_minute[0], samples[-1][1]
    latencies = sorted(r["latency_s"] for r in valid if r["ok"])
    return {
        "clients": args.clients, "seconds": round(wall, 1), "max_tokens": args.max_tokens, "model": args.base,
        "requests": len(results), "by_kind": dict(by_kind), "statuses": dict(statuses),
        "valid_requests": len(valid), "valid_answered": sum(r["ok"] for r in valid),
        "responses_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "transport_errors": statuses.get("None", 0), "unexpected": len(failed),
        "valid_latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "valid_latency_max_s": latencies[-1] if latencies else None,
        "rss_mib_at_1min": rss_start, "rss_mib_at_end": rss_end, "rss_mib_max": max(rss for _, rss in samples),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
        "cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "errors": [r["error"] for r in failed][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    parser.add_argument("--timeout", type=float, default=600.0, help="client timeout per request (s)")
    parser.add_argument("--base", default="smollm2-135m-instruct", help="what the started server serves")
    parser.add_argument("--model", default="smollm2", help="model name the clients send")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "soak")
    args = parser.parse_args()
    proc = start_server(args)
    try:
        results, samples, wall = asyncio.run(run_soak(args, proc.pid))
    finally:
        proc.terminate()
        _, server_log = proc.communicate(timeout=60)
    summary = summarize(results, samples, wall, args)
    summary["key_in_server_log"] = KEY in server_log
    checks = {
        "zero 5xx": summary["responses_5xx"] == 0,
        "zero transport errors": summary["transport_errors"] == 0,
        "every valid request answered": summary["valid_answered"] == summary["valid_requests"] > 0,
        "every response as expected": summary["unexpected"] == 0,
        "RSS growth under 10% (minute 1 -> end)": summary["rss_growth_pct"] < 10,
        "API key never in the server log": not summary["key_in_server_log"],
    }
    summary["checks"] = checks
    print("| measure | value |\n|---|---|")
    for key in ("clients", "seconds", "requests", "valid_requests", "valid_answered", "responses_5xx",
                "transport_errors", "unexpected", "valid_latency_p50_s", "valid_latency_max_s", "rss_mib_at_1min",
                "rss_mib_at_end", "rss_mib_max", "rss_growth_pct", "load_average_at_end"):
        print(f"| {key} | {summary[key]} |")
    print(f"| statuses | {summary['statuses']} |")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")

    sys.path.insert(0, str(REPO / "src"))
    from loratune.runs import write_json_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "soak.json", {"summary": summary, "rss_samples": samples, "requests": results})
    _plot_rss(samples, args.out / "rss.png", args)
    print(f"wrote {args.out}/soak.json, rss.png")
    if not all(checks.values()):
        raise SystemExit(1)


def _plot_rss(samples: list[tuple[float, float]], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loratune.runs import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t for t, _ in samples], [r for _, r in samples], marker=".")
    ax.axvline(60, color="grey", linestyle=":", label="minute 1 (baseline)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"soak: {args.clients} clients, mixed valid/invalid requests")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
