"""Search at scale: a 10^7-vector IVF-PQ index re-scored from disk, filtered QPS, and hybrid vs dense.

    python -m benchmarks.bench_search_scale --part scale  [--size 10000000]   -> results/bench_search_scale.json
    python -m benchmarks.bench_search_scale --part hybrid                     -> results/bench_search_hybrid.json

scale: the corpus's real MiniLM vectors (bench_search's cache; 1,000 held-out sentences are the
queries) plus synthetic vectors drawn around random real ones (as bench_search's 1M set), streamed
chunk by chunk into an IVF-PQ index whose exact vectors go to disk (`rescore`), so the 10^7
vectors never sit in RAM at once. Each row carries metadata {"bucket": i % 100} for 1% and 10%
filters. The saved index is then served by a fresh process (SearchIndex.load, as `diffcse serve`
does): its peak RSS, recall@10 against exact search over the same vectors, and QPS, with and
without re-scoring. Ground truth is plain numpy over the saved exact-vector file.

hybrid: STS-B test as a small labelled retrieval set: every distinct sentence is a document;
each pair's first sentence is a query whose relevant document is its partner. Recall@10 (the
query itself left out) for dense, lexical (BM25) and hybrid (RRF), over all pairs and over those
scored >= 4 (paraphrases).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffcse.core.runtime import quiet_openmp

quiet_openmp()

import numpy as np  # noqa: E402

from benchmarks.bench_search import cached_embeddings, exact_top_k, read_corpus  # noqa: E402
from benchmarks.common import loadavg, machine_probe, peak_rss_mb, record_settings, write_result  # noqa: E402
from diffcse.core.io import default_corpus  # noqa: E402
from diffcse.core.runtime import set_threads  # noqa: E402

CHUNK = 100_000
TARGET = {"peak_rss_gb": 4.0, "recall_at_10": 0.95, "qps_batched": 100}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("scale", "hybrid", "selectors"), required=True,
                   help="selectors: on the index --part scale built, filtered QPS with the ID selector the index "
                        "uses (a bitmap) against faiss's IDSelectorBatch, alternated; added to its JSON")
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--cache-dir", type=Path, default=Path("runs/bench_search"))
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench_search_scale"))
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--size", type=int, default=10_000_000)
    p.add_argument("--real", type=int, default=None,
                   help="use the corpus's first N sentences as the real vectors (default: all; encoding all 113,699 "
                        "takes ~6 min on 2 idle cores)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--noise", type=float, default=0.04)
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--train-size", type=int, default=4096 * 40)
    p.add_argument("--rescore", type=int, default=10)
    p.add_argument("--nprobes", default="16,32,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)  # the serving child process
    p.add_argument("--serve-again", metavar="NAME", default=None,
                   help="measure serving of the index already built in --work-dir again, in a fresh process, and "
                        "store it as scale.NAME in the existing --output JSON (e.g. after a change to search)")
    return p.parse_args(argv)


def synthetic_chunk(real: np.ndarray, seed: int, number: int, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `number` of the synthetic rows (deterministic per chunk): vectors and their parents' rows."""
    rng = np.random.default_rng([seed, number])
    parents = rng.integers(0, len(real), n)
    scale = rng.uniform(noise * 0.4, noise * 1.25, size=(n, 1)).astype(np.float32)
    chunk = real[parents] + scale * rng.standard_normal((n, real.shape[1]), dtype=np.float32)
    chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    return chunk, parents


def chunks(real: np.ndarray, args: argparse.Namespace):
    """(first id, vectors, parent rows) over the whole set: the real vectors, then the synthetic ones."""
    for start in range(0, len(real), CHUNK):
        stop = min(start + CHUNK, len(real))
        yield start, real[start:stop], np.arange(start, stop)
    for number, start in enumerate(range(len(real), args.size, CHUNK)):
        vecs, parents = synthetic_chunk(real, args.seed, number, min(CHUNK, args.size - start), args.noise)
        yield start, vecs, parents


def peak_rss_gb() -> float:
    """This process's peak resident memory (GiB)."""
    return round(peak_rss_mb() / 1024, 3)


def run_scale(args: argparse.Namespace) -> dict:
    """Build the large index streaming, save it, compute the truth, and measure serving in a fresh process."""
    from diffcse.search import SearchIndex, read_manifest
    from diffcse.search.vectors import VECTORS_FILE

    texts = read_corpus(args.corpus)[: args.real]
    vectors, meta = cached_embeddings(args, texts)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(vectors))
    queries = np.ascontiguousarray(vectors[np.sort(perm[: args.queries])], dtype=np.float32)
    keep = np.sort(perm[args.queries :])
    real = np.ascontiguousarray(vectors[keep], dtype=np.float32)
    real_texts = [texts[i] for i in keep]
    del vectors
    args.work_dir.mkdir(parents=True, exist_ok=True)
    path = args.work_dir / "index"
    shutil.rmtree(path, ignore_errors=True)
    load0 = loadavg()
    t0 = time.perf_counter()
    # Training sample: drawn from the stream itself (every chunk contributes), as a user would.
    share = args.train_size / args.size
    sample = [v[rng.random(len(v)) < share] for _, v, _ in chunks(real, args)]
    sample_arr = np.concatenate(sample)[: args.train_size]
    del sample
    index = SearchIndex.create(real.shape[1], "ivfpq", {"nlist": args.nlist, "train_size": args.train_size,
                                                         "rescore": args.rescore})
    index.train_vectors(sample_arr, expected_count=args.size, seed=args.seed)
    del sample_arr
    train_s = time.perf_counter() - t0
    for start, vecs, parents in chunks(real, args):
        ids = np.arange(start, start + len(vecs))
        index.add_vectors(vecs, [real_texts[p] for p in parents], [{"bucket": int(i % 100)} for i in ids])
        if start // CHUNK % 10 == 0:
            print(f"  added {start + len(vecs):,} ({time.perf_counter() - t0:.0f}s, load {loadavg()[0]})", flush=True)
    add_s = time.perf_counter() - t0 - train_s
    index.save(path)
    build_s = time.perf_counter() - t0
    build_rss = peak_rss_gb()
    manifest = read_manifest(path)
    index.close()
    del index
    gc.collect()
    gen = path / manifest.generation
    sizes = {f.name: f.stat().st_size for f in gen.iterdir()}
    print(f"built {args.size:,} in {build_s:.0f}s (train {train_s:.0f}s); files {sizes}", flush=True)
    # Ground truth over the saved exact vectors (what the index holds), by plain numpy.
    t1 = time.perf_counter()
    base = np.memmap(gen / VECTORS_FILE, dtype=np.float32, mode="r", shape=(manifest.next_id, real.shape[1]))
    truth = exact_top_k(base, queries, 10, block=262_144)
    truth_s = time.perf_counter() - t1
    del base
    np.save(args.work_dir / "queries.npy", queries)
    np.save(args.work_dir / "truth.npy", truth)
    serving = serve_in_child(path, args)
    return {
        "n": args.size, "n_real": len(real), "queries": len(queries), "kind": "ivfpq", "params": manifest.params,
        "encoding": meta,
        "train_s": round(train_s, 1), "add_s": round(add_s, 1), "build_s": round(build_s, 1),
        "build_peak_rss_gb": build_rss, "files_bytes": sizes, "disk_bytes": sum(sizes.values()),
        "truth_s": round(truth_s, 1), "loadavg_build": [load0, loadavg()], "serving": serving,
    }


def serve_in_child(path: Path, args: argparse.Namespace) -> dict:
    """Measure serving the saved index at `path` in a fresh process (its peak RSS is serving's alone)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_search_scale", "--part", "scale", "--serve", str(path),
           "--work-dir", str(args.work_dir), "--threads", str(args.threads), "--nprobes", args.nprobes]
    served = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if served.returncode != 0:
        raise RuntimeError(f"serving process failed:\n{served.stderr[-3000:]}")
    return json.loads(served.stdout.strip().splitlines()[-1])


def scale_result(args: argparse.Namespace, flag: str) -> tuple[Path, dict]:
    """The --output JSON of an earlier --part scale run, which measurements of its index are added to."""
    from diffcse.core.io import read_json

    output = args.output or Path("results/bench_search_scale.json")
    result = read_json(output)
    if not result or "scale" not in result:
        sys.exit(f"{flag}: {output} holds no scale result to add to; run --part scale first")
    return output, result


def serve_again(args: argparse.Namespace) -> Path:
    """Serving of the index built earlier, measured again and added to the existing result as scale.NAME."""
    output, result = scale_result(args, "--serve-again")
    before = loadavg()
    serving = serve_in_child(args.work_dir / "index", args)
    serving.update({"loadavg_before": before, "loadavg_after": loadavg(), "machine": machine_probe(),
                    "command": f"python -m benchmarks.bench_search_scale --part scale --serve-again {args.serve_again}"})
    result["scale"][args.serve_again] = serving
    write_result(output, result)
    return output


def selector_ab(args: argparse.Namespace) -> Path:
    """Filtered search on the built index with a bitmap selector vs an IDSelectorBatch, alternated, page cache warm."""
    import faiss

    import diffcse.search.index as index_module
    from diffcse.search import SearchIndex

    output, result = scale_result(args, "--part selectors")
    index = SearchIndex.load(args.work_dir / "index")
    queries = np.load(args.work_dir / "queries.npy")
    nprobe = 32
    builders = {"bitmap (ours)": index_module.id_selector,
                "IDSelectorBatch": lambda ids: index_module.Allowed(ids, faiss.IDSelectorBatch(ids), None, 0)}
    rows = []
    for where, share in (({"bucket": {"lt": 10}}, 0.10), ({"bucket": 7}, 0.01)):
        for rnd in range(2):
            for name, build in builders.items():
                index_module.id_selector = build
                index._filter_cache.clear()
                index.search_vectors(queries[:5], top_k=10, nprobe=nprobe, where=where)  # SQL scan, selector built
                t = time.perf_counter()
                index.search_vectors(queries, top_k=10, nprobe=nprobe, where=where)
                batched = time.perf_counter() - t
                t = time.perf_counter()
                for q in queries[:20]:
                    index.search_vectors(q, top_k=10, nprobe=nprobe, where=where)
                single = (time.perf_counter() - t) / 20
                rows.append({"selector": name, "selectivity": share, "round": rnd, "nprobe": nprobe,
                             "qps_batched": round(len(queries) / batched, 1), "qps_single": round(1 / single, 1),
                             "loadavg": loadavg()})
                print(rows[-1], flush=True)
    index_module.id_selector = builders["bitmap (ours)"]
    result["scale"]["selector_ab"] = {
        "what": "filtered search, re-scored, nprobe 32, both selectors cached (built once per filter), two "
                "alternating rounds after a warm-up call each; 1,000 queries batched, 20 single",
        "rows": rows, "machine": machine_probe(),
        "command": "python -m benchmarks.bench_search_scale --part selectors"}
    write_result(output, result)
    return output


def serve(args: argparse.Namespace) -> dict:
    """In a fresh process: load the saved index and measure what serving it costs (printed as JSON)."""
    from diffcse.search import SearchIndex

    t0 = time.perf_counter()
    index = SearchIndex.load(args.serve)
    load_s = time.perf_counter() - t0
    queries = np.load(args.work_dir / "queries.npy")
    truth = np.load(args.work_dir / "truth.npy")

    def measure(nprobe: int, where: dict | None = None, n_single: int = 50) -> dict:
        t = time.perf_counter()
        # The first call warms the page cache a little and, with a filter, evaluates it in SQLite
        # (a scan of every row's metadata); later calls take its ids from the index's filter cache.
        index.search_vectors(queries[:10], top_k=10, nprobe=nprobe, where=where)
        first = time.perf_counter() - t
        t = time.perf_counter()
        res = index.search_vectors(queries, top_k=10, nprobe=nprobe, where=where)
        batched = time.perf_counter() - t
        t = time.perf_counter()
        for q in queries[:n_single]:
            index.search_vectors(q, top_k=10, nprobe=nprobe, where=where)
        single = (time.perf_counter() - t) / n_single
        row = {"nprobe": nprobe, "qps_batched": round(len(queries) / batched, 1), "qps_single": round(1 / single, 1),
               "first_call_s": round(first, 2), "loadavg": loadavg()}
        if where is None:
            row["recall_at_10"] = round(float(np.mean([len({h.id for h in r} & set(t.tolist())) / 10
                                                       for r, t in zip(res, truth, strict=True)])), 4)
        else:
            row["where"] = where
            row["all_match"] = all(h.metadata == {"bucket": h.metadata["bucket"]} for r in res for h in r)
        return row

    sweep = []
    for nprobe in (int(x) for x in args.nprobes.split(",")):
        sweep.append({"rescore": index.manifest.params["rescore"], **measure(nprobe)})
        print(sweep[-1], file=sys.stderr, flush=True)
    factor = index.manifest.params["rescore"]
    index._manifest.params["rescore"] = 0  # the same index without re-scoring: PQ scores alone
    for nprobe in (int(x) for x in args.nprobes.split(",")):
        sweep.append({"rescore": 0, **measure(nprobe)})
        print(sweep[-1], file=sys.stderr, flush=True)
    index._manifest.params["rescore"] = factor
    best = max((p for p in sweep if p["rescore"]), key=lambda p: (p["recall_at_10"] >= TARGET["recall_at_10"], p["qps_batched"]))
    filtered = [measure(best["nprobe"], {"bucket": 7}, n_single=20),
                measure(best["nprobe"], {"bucket": {"lt": 10}}, n_single=20)]
    for row, share in zip(filtered, (0.01, 0.10), strict=True):
        row["selectivity"] = share
    return {"load_s": round(load_s, 1), "sweep": sweep, "filtered": filtered, "peak_rss_gb": peak_rss_gb()}


def run_hybrid(args: argparse.Namespace) -> dict:
    """Recall@10 of dense, lexical and hybrid search on STS-B test pairs."""
    from diffcse.core.encoder import Encoder
    from diffcse.search import SearchIndex
    from senteval_runner.data import STSB_FILES, read_stsb_file, resolve_data_dir

    split = read_stsb_file(resolve_data_dir(None) / "downstream" / "STS" / "STSBenchmark" / STSB_FILES["test"])
    docs = sorted(set(split.a) | set(split.b))
    doc_of = {t: i for i, t in enumerate(docs)}
    encoder = Encoder.load(args.model)
    index = SearchIndex.build(encoder, docs, kind="flat", batch_size=args.batch_size)
    pairs = [(a, b, g) for a, b, g in zip(split.a, split.b, split.gold.tolist(), strict=True) if a != b]
    out: dict = {"documents": len(docs), "pairs": len(pairs)}
    for mode in ("dense", "lexical", "hybrid"):
        t = time.perf_counter()
        res = index.search([a for a, _, _ in pairs], top_k=11, mode=mode)
        secs = time.perf_counter() - t
        hit = np.array([doc_of[b] in [h.id for h in r if h.id != doc_of[a]][:10]
                        for (a, b, _), r in zip(pairs, res, strict=True)])
        gold = np.array([g for _, _, g in pairs])
        out[mode] = {"recall_at_10": round(float(hit.mean()), 4),
                     "recall_at_10_score_ge_4": round(float(hit[gold >= 4].mean()), 4),
                     "n_score_ge_4": int((gold >= 4).sum()), "seconds": round(secs, 2)}
        print(mode, out[mode], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one part and write its JSON."""
    args = parse_args(argv)
    set_threads(args.threads)
    if args.serve is not None:
        print(json.dumps(serve(args)))
        return 0
    if args.serve_again:
        print(f"wrote {serve_again(args)}")
        return 0
    if args.part == "selectors":
        print(f"wrote {selector_ab(args)}")
        return 0
    args.corpus = args.corpus or default_corpus()
    result = {"settings": record_settings(vars(args), models=("model",),
                                          paths=("corpus", "cache_dir", "work_dir", "output", "serve")),
              "machine": machine_probe(), "loadavg_start": loadavg()}
    if args.part == "scale":
        result["scale"] = run_scale(args)
        result["target"] = TARGET
    else:
        result["hybrid"] = run_hybrid(args)
    result["loadavg_end"] = loadavg()
    output = args.output or Path(f"results/bench_search_{args.part}.json")
    write_result(output, result)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
