"""A bounded load run against `diffcse serve`: concurrent clients on 127.0.0.1, mixed reads and writes.

    python -m benchmarks.bench_serve_load [--clients 8] [--seconds 60] [--docs 5000]

Builds a flat index of the corpus's first --docs sentences (packaged MiniLM, metadata
{"bucket": i % 10}), starts `diffcse serve` on a free port with an API key and --persist add
(every write is on disk before it is answered), and runs --clients threads for --seconds, each
picking per request: dense search 50%, hybrid search with a filter 15%, lexical search 10%,
upsert of its own document ids 15%, delete of one of them 10%. Records requests served, p50/p99
latency per kind, every status code, and server errors (5xx). After the run the server is stopped
and the index is loaded from disk: it must agree with what the clients were told (every document
a client upserted and did not delete is there with its last text; every deleted one is gone;
faiss and the store hold the same count). Results: results/bench_serve_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import loadavg, machine_probe, record_settings, write_result
from diffcse.core.io import default_corpus, iter_lines

KEY = "load-run-key"
MIX = (("search", 0.50), ("hybrid", 0.15), ("lexical", 0.10), ("upsert", 0.15), ("delete", 0.10))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=2, help="server's torch/faiss threads")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_serve_load"))
    p.add_argument("--output", type=Path, default=Path("results/bench_serve_load.json"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None, key: bool = False) -> tuple[int, dict | None]:
    """One request on a fresh connection; (status, JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = KEY
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, None
    finally:
        conn.close()


class Client(threading.Thread):
    """One load client: its own random stream, its own document ids, a log of what the server answered."""

    def __init__(self, number: int, port: int, texts: list[str], deadline: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.number, self.port, self.texts, self.deadline = number, port, texts, deadline
        self.rng = random.Random(seed * 1000 + number)
        self.latency: dict[str, list[float]] = {name: [] for name, _ in MIX}
        self.status: dict[str, dict[int, int]] = {name: {} for name, _ in MIX}
        self.live: dict[str, str] = {}  # doc id -> last text the server confirmed
        self.deleted: set[str] = set()
        self.serial = 0

    def run(self) -> None:
        names, weights = zip(*MIX, strict=True)
        while time.perf_counter() < self.deadline:
            kind = self.rng.choices(names, weights)[0]
            if kind == "delete" and not self.live:
                kind = "upsert"
            query = self.rng.choice(self.texts)
            t0 = time.perf_counter()
            if kind == "search":
                status, _ = call(self.port, "POST", "/search", {"queries": [query], "top_k": 10})
            elif kind == "hybrid":
                status, _ = call(self.port, "POST", "/search", {"queries": [query], "top_k": 10, "mode": "hybrid",
                                                               "where": {"bucket": {"lt": 5}}})
            elif kind == "lexical":
                status, _ = call(self.port, "POST", "/search", {"queries": [query], "top_k": 10, "mode": "lexical"})
            elif kind == "upsert":
                doc = f"c{self.number}-{self.rng.randrange(40)}"  # a small id space: many replacements
                text = f"{query} (client {self.number} version {self.serial})"
                self.serial += 1
                status, _ = call(self.port, "POST", "/upsert", {"documents": [{"id": doc, "text": text}]}, key=True)
                if status == 200:
                    self.live[doc] = text
                    self.deleted.discard(doc)
            else:
                doc = self.rng.choice(sorted(self.live))
                status, _ = call(self.port, "POST", "/delete", {"doc_ids": [doc]}, key=True)
                if status == 200:
                    del self.live[doc]
                    self.deleted.add(doc)
            self.latency[kind].append(time.perf_counter() - t0)
            self.status[kind][status] = self.status[kind].get(status, 0) + 1


def main(argv: list[str] | None = None) -> int:
    """Build, serve, load, check, write the JSON."""
    args = parse_args(argv)
    args.corpus = args.corpus or default_corpus()
    texts = [line.text for _, line in zip(range(args.docs), iter_lines(args.corpus, "corpus"), strict=False)]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = args.work_dir / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t, "metadata": {"bucket": i % 10}}) + "\n" for i, t in enumerate(texts)),
                      encoding="utf-8")
    index_dir = args.work_dir / "index"
    cli = [sys.executable, "-m", "diffcse"]
    subprocess.run([*cli, "index", "build", "--input", str(source), "--index-dir", str(index_dir), "--overwrite",
                    "--threads", str(args.threads)], check=True)
    port = free_port()
    server = subprocess.Popen([*cli, "serve", "--index-dir", str(index_dir), "--port", str(port), "--api-key", KEY,
                               "--threads", str(args.threads), "--log-level", "warning"])
    try:
        for _ in range(600):
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not come up in 300 s")
        load0 = loadavg()
        start = time.perf_counter()
        clients = [Client(i, port, texts, start + args.seconds, args.seed) for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.perf_counter() - start
        load1 = loadavg()
        stats = call(port, "GET", "/stats")[1]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
    # What the clients were told must be what is on disk.
    from diffcse.search import SearchIndex

    index = SearchIndex.load(index_dir)
    live = {d: t for c in clients for d, t in c.live.items()}
    deleted = {d for c in clients for d in c.deleted} - set(live)
    docs = index.get_docs(sorted(set(live) | deleted))
    consistency = {
        "count_on_disk": len(index), "faiss_ntotal": int(index._index.ntotal), "expected_count": args.docs + len(live),
        "live_docs_present_with_last_text": all(d in docs and docs[d].text == t for d, t in live.items()),
        "deleted_docs_absent": not (deleted & set(docs)),
        "server_count_at_end": stats.get("count") if isinstance(stats, dict) else None,
    }
    consistency["ok"] = (consistency["count_on_disk"] == consistency["faiss_ntotal"] == consistency["expected_count"]
                         and consistency["live_docs_present_with_last_text"] and consistency["deleted_docs_absent"])
    index.close()
    per_kind = {}
    for name, _ in MIX:
        lat = np.array([x for c in clients for x in c.latency[name]]) * 1000
        codes: dict[str, int] = {}
        for c in clients:
            for code, n in c.status[name].items():
                codes[str(code)] = codes.get(str(code), 0) + n
        per_kind[name] = {"requests": int(lat.size), "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
                          "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None, "status": codes}
    total = sum(k["requests"] for k in per_kind.values())
    errors = sum(n for k in per_kind.values() for code, n in k["status"].items() if code.startswith("5"))
    result = {
        "settings": record_settings(vars(args), paths=("corpus", "work_dir", "output")),
        "machine": machine_probe(), "wall_s": round(wall, 1), "requests": total, "requests_per_s": round(total / wall, 1),
        "server_errors_5xx": errors, "per_kind": per_kind, "consistency": consistency, "loadavg": [load0, load1],
    }
    write_result(args.output, result)
    print(json.dumps({k: result[k] for k in ("requests", "requests_per_s", "server_errors_5xx", "consistency")}, indent=1))
    print(f"wrote {args.output}")
    return 0 if errors == 0 and consistency["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
