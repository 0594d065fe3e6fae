"""Load test of `llama-steer serve` on loopback: one replica and two, steered and unsteered
requests side by side in one run.

    OMP_WAIT_POLICY=passive python bench/serve.py                   # embedded VLM, defaults
    python bench/serve.py --requests 60 --concurrency 4 --reps 3 --threads 1

Starts the replicas itself (`python -m llama_steer.apps.serve --port P -t THREADS`, each
its own process and model) on 127.0.0.1 and sends bounded traffic there only. Requests are
spread round-robin over the replicas by the client, standing in for any HTTP load balancer
(steering lives in the request, so any replica answers any request). Each rep runs the
steered and the unsteered phase back to back, in alternating order, so drift hits both.
Prints requests/s and p50/p95 latency per phase, and steered/unsteered throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from llama_steer import comics

QUESTION = "What is in this panel?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(n: int, threads: int) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    for _ in range(n):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "llama_steer.apps.serve",
            "--port",
            str(port),
            "-t",
            str(threads),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.time() + 300
    for url in urls:
        while True:
            try:
                if httpx.get(url + "/steer/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                stop(procs)
                raise SystemExit(f"replica {url} did not start")
            time.sleep(0.2)
    return procs, urls


def stop(procs) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def bodies(n_strips: int, steered: bool) -> list[dict]:
    out = []
    for seed in range(n_strips):
        layout = ("2x3", "1x6")[seed % 2]
        uri = comics.data_uri(comics.render(comics.make_strip(9000 + seed, layout), "numpy"))
        for k in range(1, 7):
            body = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": uri}},
                            {"type": "text", "text": QUESTION},
                        ],
                    }
                ],
                "temperature": 0,
                "max_tokens": 12,
            }
            if steered:
                roi = f"panel:{k}@2x3" if layout == "2x3" else f"panel:{k}/6"
                body["steering"] = {"roi": roi}
            out.append(body)
    return out


def phase(urls, work: list[dict], n: int, concurrency: int, timeout: float):
    """n requests, `concurrency` at a time, round-robin over urls: (req/s, latencies s)."""
    rr = itertools.cycle(urls)
    jobs = [(next(rr), work[i % len(work)]) for i in range(n)]
    lat = []

    def one(job):
        url, body = job
        t = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        return time.perf_counter() - t

    with httpx.Client() as client, cf.ThreadPoolExecutor(concurrency) as ex:
        t0 = time.perf_counter()
        lat = list(ex.map(one, jobs))
        wall = time.perf_counter() - t0
    return n / wall, lat


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--replicas", default="1,2", help="replica counts to measure")
    ap.add_argument("--requests", type=int, default=48, help="requests per phase")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    ap.add_argument("--strips", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args(argv)
    work = {True: bodies(a.strips, True), False: bodies(a.strips, False)}
    print(
        f"{a.requests} requests per phase, {a.concurrency} clients, {a.reps} reps, "
        f"{a.threads} thread(s) per replica, {os.cpu_count()} cores"
    )
    print(f"{'replicas':>8} {'requests':>9} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for n in (int(x) for x in a.replicas.split(",")):
        procs, urls = start(n, a.threads)
        try:
            phase(urls, work[True], 2 * n, n, a.timeout)  # warm each replica, both kinds
            phase(urls, work[False], 2 * n, n, a.timeout)
            res = {True: [], False: []}
            lats = {True: [], False: []}
            ratios = []
            for rep in range(a.reps):
                order = (True, False) if rep % 2 == 0 else (False, True)
                got = {}
                for steered in order:
                    rps, lat = phase(urls, work[steered], a.requests, a.concurrency, a.timeout)
                    got[steered] = rps
                    res[steered].append(rps)
                    lats[steered].extend(lat)
                ratios.append(got[True] / got[False])
            for steered in (False, True):
                name = "steered" if steered else "plain"
                print(
                    f"{n:>8} {name:>9} {statistics.median(res[steered]):7.1f} "
                    f"{1000 * pct(lats[steered], 0.5):8.1f} "
                    f"{1000 * pct(lats[steered], 0.95):8.1f}"
                )
            print(
                f"{n:>8} steered/plain throughput {statistics.median(ratios):.3f} "
                f"(per rep: {', '.join(f'{r:.3f}' for r in ratios)})"
            )
        finally:
            stop(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
