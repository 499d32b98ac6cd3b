"""Server throughput with 1, 4 and 8 concurrent streaming clients, in one run.

    python bench/bench_serve.py [--bundle DIR] [--requests 4] [--max-tokens 32]

Starts `vlm-chat serve --no-ui` on a free loopback port in a subprocess, then for each
concurrency level runs that many client threads, each sending `--requests` streaming
chat requests (one image + a question) one after another. Reports completion tokens/s
over the whole level, requests/s, and the median time to the first streamed token
(which includes waiting for the generation slot). Ratios are against 1 client.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def image_url(seed: int) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).ellipse((10 + seed % 30, 10, 50 + seed % 30, 50), fill=(200, 30 + seed * 20 % 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(url: str, seed: int, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url(seed)}},
        {"type": "text", "text": "Describe this image in detail."}]}],
        "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, usage = None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return {"ttft": first or 0.0, "seconds": time.perf_counter() - start, "tokens": usage["completion_tokens"]}


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        batches = pool.map(lambda c: [one_request(url, c * 100 + r, max_tokens) for r in range(requests)], range(clients))
        results = [r for batch in batches for r in batch]
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(results), "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "requests_per_s": len(results) / wall, "median_ttft": statistics.median(r["ttft"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None)
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    from bench.bench_generate import default_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or default_bundle(Path(tmp))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--model", bundle, "--no-ui", "--port", str(port)],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            one_request(url, 0, 4)  # warm-up
            levels = [run_level(url, c, args.requests, args.max_tokens) for c in (1, 4, 8)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    base = levels[0]["tokens_per_s"]
    print(f"streaming clients, {args.requests} requests each, one image + question, max {args.max_tokens} new tokens")
    print(f"{'clients':>7} {'requests':>8} {'tokens/s':>9} {'vs 1':>6} {'req/s':>6} {'median TTFT s':>13}")
    for level in levels:
        print(f"{level['clients']:>7} {level['requests']:>8} {level['tokens_per_s']:>9.1f} {level['tokens_per_s'] / base:>6.2f} "
              f"{level['requests_per_s']:>6.2f} {level['median_ttft']:>13.2f}")


if __name__ == "__main__":
    main()
