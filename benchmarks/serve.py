"""How fast `gru-lm serve` answers: the time to the first streamed character, and characters
per second for 1 and for 8 concurrent clients, against the same model's generation called
directly in the same process (the reference: what the server adds is the ratio).

Run: python benchmarks/serve.py RUN [--chars 300] [--repeats 5] [--threads 2]
     (nothing else running; the server runs in this process, on 127.0.0.1, a free port)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
import uvicorn

import gru_lm
from gru_lm.server import Limits, create_app


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--chars", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = gru_lm.load(args.run)
    prefix = "time traveller"
    server = uvicorn.Server(uvicorn.Config(create_app(run, Limits(max_concurrent=8)),
                                           host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    t = time.perf_counter()  # the reference: the API called directly
    for seed in range(args.repeats):
        run.predict(prefix, args.chars, seed=seed)
    direct = args.repeats * args.chars / (time.perf_counter() - t)

    first, rates = [], []
    with httpx.Client(base_url=url, timeout=600) as c:
        for seed in range(args.repeats):
            t = time.perf_counter()
            got = None
            with c.stream("POST", "/api/stream", json={"prefix": prefix, "seed": seed,
                                                       "num_chars": args.chars}) as s:
                for _line in s.iter_lines():
                    if got is None:
                        got = time.perf_counter() - t
            first.append(got)
            rates.append(args.chars / (time.perf_counter() - t))

    def one(seed: int) -> None:
        r = httpx.post(url + "/api/continue", json={"prefix": prefix, "seed": seed,
                                                    "num_chars": args.chars}, timeout=600)
        r.raise_for_status()

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(8 * args.repeats)))
    eight = 8 * args.repeats * args.chars / (time.perf_counter() - t)
    server.should_exit = True
    out = {"cpu": cpu_name(), "threads": args.threads, "run": args.run,
           "model": run.config.model.name, "chars": args.chars,
           "direct_chars_per_s": round(direct, 1),
           "first_char_ms_median": round(1000 * statistics.median(first), 1),
           "one_client_chars_per_s": round(statistics.median(rates), 1),
           "one_client_vs_direct": round(statistics.median(rates) / direct, 3),
           "eight_clients_chars_per_s": round(eight, 1),
           "eight_clients_vs_direct": round(eight / direct, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
