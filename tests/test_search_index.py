"""SearchIndex at the vector level: every kind against brute-force numpy, persistence, add/delete, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# Before faiss loads its OpenMP runtime: idle threads sleep instead of spinning (2 shared cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcse.search import (  # noqa: E402
    CorruptIndexError,
    EmptyQueryError,
    IndexFormatError,
    IndexMismatchError,
    SearchIndex,
    SearchIndexError,
)
from diffcse.search.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from diffcse.search.rwlock import RWLock  # noqa: E402

# One faiss thread: tiny k-means jobs (PQ training) run 5-10x slower when 2 OpenMP threads spin on
# 2 shared, busy cores; nothing here needs faiss parallelism to be tested.
faiss.omp_set_num_threads(1)

DIM = 32
N = 3000
# Recall@10 floors against exact search at each kind's default query-time settings on the
# clustered data below. Measured: ivf 1.00, hnsw 1.00, ivfpq 0.85 (m=16: 2 dims per byte code).
# The floors leave room for k-means/HNSW randomness, not for a broken metric (an L2/IP mix-up
# fails test_ivf_exhaustive_equals_exact outright).
RECALL_FLOOR = {"ivf": 0.90, "hnsw": 0.95, "ivfpq": 0.70}
PARAMS = {"flat": {}, "ivf": {}, "hnsw": {}, "ivfpq": {"m": 16}}


def clustered(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    """Points around random centres (like sentence embeddings: clumpy, not uniform)."""
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, len(centers), n)] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict:
    """Corpus vectors, held-out query vectors, and the exact top-10 by cosine."""
    centers = np.random.default_rng(123).normal(size=(40, DIM))
    x = clustered(N, 1, centers)
    q = clustered(64, 2, centers)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn.T
    order = np.argsort(-sims, axis=1)
    return {"x": x, "q": q, "sims": sims, "order": order, "texts": [f"doc {i}" for i in range(N)]}


@pytest.fixture(scope="module")
def built(data: dict) -> dict[str, SearchIndex]:
    """One index per kind over the same vectors (ids 0..N-1 = row numbers)."""
    out = {}
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        idx = SearchIndex.create(DIM, kind, PARAMS[kind])
        ids = idx.add_vectors(data["x"], data["texts"], [{"row": i} for i in range(N)])
        assert ids == list(range(N))
        out[kind] = idx
    return out


def ids_of(results: list) -> np.ndarray:
    """Ids as an array [n_queries, k] (rows must be complete)."""
    return np.array([[hit.id for hit in row] for row in results])


def recall_at_10(results: list, order: np.ndarray) -> float:
    """Mean share of the exact top-10 found in each result list."""
    return float(np.mean([len({h.id for h in row} & set(order[i, :10].tolist())) / 10 for i, row in enumerate(results)]))


def test_flat_is_exact(built: dict, data: dict) -> None:
    res = built["flat"].search_vectors(data["q"], top_k=10)
    np.testing.assert_array_equal(ids_of(res), data["order"][:, :10])
    scores = np.array([[h.score for h in row] for row in res])
    np.testing.assert_allclose(scores, np.take_along_axis(data["sims"], data["order"][:, :10], axis=1), atol=1e-5)
    assert res[0][0].text == data["texts"][res[0][0].id]
    assert res[0][0].metadata == {"row": res[0][0].id}


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_recall_floor(built: dict, data: dict, kind: str) -> None:
    res = built[kind].search_vectors(data["q"], top_k=10)
    recall = recall_at_10(res, data["order"])
    assert recall >= RECALL_FLOOR[kind], f"{kind} recall@10 {recall:.3f} < floor {RECALL_FLOOR[kind]}"
    if kind != "ivfpq":  # ivf/hnsw store full vectors: scores are the true cosines
        for i, row in enumerate(res[:8]):
            for hit in row:
                assert hit.score == pytest.approx(float(data["sims"][i, hit.id]), abs=1e-5)


def test_ivf_exhaustive_equals_exact(built: dict, data: dict) -> None:
    # Probing every list must give exact inner-product results; an L2-metric IVF would not.
    idx = built["ivf"]
    nlist = idx.manifest.params["nlist"]
    assert nlist > 1
    res = idx.search_vectors(data["q"], top_k=10, nprobe=nlist)
    np.testing.assert_array_equal(ids_of(res), data["order"][:, :10])
    few = recall_at_10(idx.search_vectors(data["q"], top_k=10, nprobe=1), data["order"])
    assert few < 1.0, "nprobe=1 should miss some neighbours: the query-time nprobe is not applied"


def test_hnsw_ef_search_is_applied(built: dict, data: dict) -> None:
    low = recall_at_10(built["hnsw"].search_vectors(data["q"], top_k=10, ef_search=10), data["order"])
    high = recall_at_10(built["hnsw"].search_vectors(data["q"], top_k=10, ef_search=256), data["order"])
    assert high >= low and high >= 0.97


def test_every_kind_uses_inner_product(built: dict) -> None:
    for kind, idx in built.items():
        inner = idx._index
        if isinstance(inner, faiss.IndexIDMap):
            inner = faiss.downcast_index(inner.index)
        assert inner.metric_type == faiss.METRIC_INNER_PRODUCT, kind


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_top_k_and_threshold_single_and_batched(built: dict, data: dict, kind: str) -> None:
    idx = built[kind]
    threshold = float(np.quantile(data["sims"][:, :], 0.995))
    batched = idx.search_vectors(data["q"], top_k=7, threshold=threshold)
    assert len(batched) == len(data["q"])
    some_cut = False
    for i, row in enumerate(batched):
        single = idx.search_vectors(data["q"][i], top_k=7, threshold=threshold)
        assert len(single) == 1
        assert [h.id for h in single[0]] == [h.id for h in row]
        assert len(row) <= 7
        assert all(h.score >= threshold for h in row)
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        unthresholded = idx.search_vectors(data["q"][i], top_k=7)[0]
        assert len(unthresholded) == 7
        assert [h.id for h in row] == [h.id for h in unthresholded if h.score >= threshold]
        some_cut |= 0 < len(row) < 7
    assert some_cut, "threshold never cut a list short: the test data did not exercise it"
    if kind == "flat":
        for i, row in enumerate(batched):
            got = {h.id for h in row}
            top = data["order"][i, :7]
            # float32 (faiss) vs float64 (numpy) may disagree within 1e-5 of the threshold.
            assert {j for j in top if data["sims"][i, j] >= threshold + 1e-5} <= got
            assert got <= {j for j in top if data["sims"][i, j] >= threshold - 1e-5}


def test_top_k_larger_than_index_never_returns_padding() -> None:
    # faiss pads missing hits with id -1; they must not turn into results.
    rng = np.random.default_rng(0)
    for kind in ("flat", "hnsw", "ivf"):
        idx = SearchIndex.create(8, kind)
        idx.add_vectors(rng.normal(size=(3, 8)), ["a", "b", "c"])
        res = idx.search_vectors(rng.normal(size=(2, 8)), top_k=50)
        assert [sorted(h.text for h in row) for row in res] == [["a", "b", "c"]] * 2, kind


def test_empty_index_returns_empty_lists() -> None:
    for kind in ("flat", "ivf", "hnsw"):
        idx = SearchIndex.create(8, kind)
        assert idx.search_vectors(np.ones((2, 8)), top_k=3) == [[], []]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_save_load_same_results(built: dict, data: dict, kind: str, tmp_path: Path) -> None:
    idx = built[kind]
    before = idx.search_vectors(data["q"], top_k=10, threshold=0.2)
    idx.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    after = loaded.search_vectors(data["q"], top_k=10, threshold=0.2)
    assert after == before
    assert len(loaded) == N and loaded.kind == kind and loaded.manifest.params == idx.manifest.params
    m = read_manifest(tmp_path / "idx")
    assert (m.dim, m.kind, m.count, m.metric, m.normalized) == (DIM, kind, N, "inner_product", True)
    loaded.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_and_delete(data: dict, kind: str, tmp_path: Path) -> None:
    idx = SearchIndex.create(DIM, kind)
    idx.add_vectors(data["x"][:2000], data["texts"][:2000])
    q = data["q"][:16]
    # Delete every query's current top-3; they must vanish, and top_k must still be filled.
    top = {h.id for row in idx.search_vectors(q, top_k=3) for h in row}
    assert idx.delete(sorted(top) + [10**9]) == len(top)
    assert idx.delete(sorted(top)) == 0
    assert len(idx) == 2000 - len(top)
    res = idx.search_vectors(q, top_k=10)
    assert all(len(row) == 10 for row in res)
    assert not top & {h.id for row in res for h in row}
    assert idx.get(top) == {}
    # Persisted deletions (HNSW keeps tombstones) and ids never reused after reload.
    idx.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    assert not top & {h.id for row in loaded.search_vectors(q, top_k=10) for h in row}
    new_ids = loaded.add_vectors(data["x"][2000:2010], data["texts"][2000:2010], [{"n": i} for i in range(10)])
    assert new_ids == list(range(2000, 2010))
    hit = loaded.search_vectors(data["x"][2005], top_k=1)[0][0]
    assert (hit.id, hit.text, hit.metadata) == (2005, data["texts"][2005], {"n": 5})
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert len(loaded) == 2000 - len(top) + 10
    loaded.save()
    again = SearchIndex.load(tmp_path / "idx")
    assert len(again) == len(loaded) and again.stats()["deleted_tombstones"] == (len(top) if kind == "hnsw" else 0)


def test_loaded_generation_is_never_modified(data: dict, tmp_path: Path) -> None:
    idx = SearchIndex.create(DIM, "flat")
    idx.add_vectors(data["x"][:100], data["texts"][:100])
    idx.save(tmp_path / "idx")
    gen = tmp_path / "idx" / read_manifest(tmp_path / "idx").generation
    snapshot = {p.name: p.read_bytes() for p in gen.iterdir()}
    loaded = SearchIndex.load(tmp_path / "idx")
    loaded.add_vectors(data["x"][100:110], data["texts"][100:110])
    loaded.delete([0, 1])
    assert {p.name: p.read_bytes() for p in gen.iterdir()} == snapshot
    assert len(SearchIndex.load(tmp_path / "idx")) == 100


def _saved(tmp_path: Path, data: dict, kind: str = "flat", n: int = 200) -> Path:
    idx = SearchIndex.create(DIM, kind)
    idx.add_vectors(data["x"][:n], data["texts"][:n])
    return idx.save(tmp_path / "idx")


def test_corrupted_and_truncated_files_are_named(data: dict, tmp_path: Path) -> None:
    path = _saved(tmp_path, data)
    m = read_manifest(path)
    index_file = path / m.generation / "index.faiss"
    raw = index_file.read_bytes()
    index_file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptIndexError, match=r"index\.faiss.*truncated"):
        SearchIndex.load(path)
    # Same size, flipped bytes: only the checksum can tell.
    flipped = bytearray(raw)
    flipped[len(raw) // 2 : len(raw) // 2 + 16] = bytes(16)
    index_file.write_bytes(bytes(flipped))
    with pytest.raises(CorruptIndexError, match=r"index\.faiss.*sha256"):
        SearchIndex.load(path)
    # A truncated file whose manifest was edited to match: faiss's own read error, with the file named.
    index_file.write_bytes(raw[:100])
    data_m = json.loads((path / MANIFEST_NAME).read_text())
    data_m["files"]["index"]["bytes"] = 100
    data_m["files"]["index"]["sha256"] = None
    (path / MANIFEST_NAME).write_text(json.dumps(data_m))
    with pytest.raises(CorruptIndexError, match=r"faiss could not read index file .*index\.faiss"):
        SearchIndex.load(path)
    store = path / m.generation / "store.sqlite"
    index_file.write_bytes(raw)
    data_m["files"]["index"]["bytes"] = len(raw)
    (path / MANIFEST_NAME).write_text(json.dumps(data_m))
    store.write_bytes(b"not a database" * 100)
    with pytest.raises(CorruptIndexError, match=r"store\.sqlite"):
        SearchIndex.load(path)


def test_manifest_errors(data: dict, tmp_path: Path) -> None:
    path = _saved(tmp_path, data)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match=r"format version 99 is newer.*upgrade diffcse"):
        SearchIndex.load(path)
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "dim": "32"}))
    with pytest.raises(IndexFormatError, match=r"manifest\.json.*'dim'"):
        SearchIndex.load(path)
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        SearchIndex.load(path)
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "count": 5}))
    with pytest.raises(CorruptIndexError, match="200 rows but the manifest says 5"):
        SearchIndex.load(path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        SearchIndex.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SearchIndex.load(tmp_path / "nowhere")


def test_input_errors(built: dict, data: dict) -> None:
    idx = built["flat"]
    with pytest.raises(IndexMismatchError, match="dimension 16 but the index has dimension 32"):
        idx.search_vectors(np.ones((1, 16)))
    with pytest.raises(EmptyQueryError, match="all zeros"):
        idx.search_vectors(np.zeros((1, DIM)))
    with pytest.raises(EmptyQueryError, match="no query vectors"):
        idx.search_vectors(np.zeros((0, DIM)))
    with pytest.raises(SearchIndexError, match="NaN"):
        idx.search_vectors(np.full((1, DIM), np.nan))
    with pytest.raises(SearchIndexError, match="top_k must be a positive integer"):
        idx.search_vectors(data["q"][:1], top_k=0)
    with pytest.raises(SearchIndexError, match="threshold must be a finite number"):
        idx.search_vectors(data["q"][:1], threshold=float("nan"))
    fresh = SearchIndex.create(DIM, "flat")
    with pytest.raises(SearchIndexError, match="metadata #1 is not JSON-serialisable"):
        fresh.add_vectors(data["x"][:2], ["a", "b"], [None, {"x": object()}])
    with pytest.raises(SearchIndexError, match="text #1 is empty"):
        fresh.add_vectors(data["x"][:2], ["a", "  "])
    with pytest.raises(SearchIndexError, match="got 2 vectors for 3 texts"):
        fresh.add_vectors(data["x"][:2], ["a", "b", "c"])
    assert len(fresh) == 0 and fresh.search_vectors(data["q"][:1]) == [[]]
    with pytest.raises(SearchIndexError, match="unknown index kind 'lsh'"):
        SearchIndex.create(DIM, "lsh")
    with pytest.raises(SearchIndexError, match="parameter 'nprobe' does not apply to kind 'hnsw'"):
        SearchIndex.create(DIM, "hnsw", {"nprobe": 4})
    with pytest.raises(SearchIndexError, match="ivfpq with nbits=8 needs at least 256 training vectors"):
        SearchIndex.create(DIM, "ivfpq").add_vectors(data["x"][:100], data["texts"][:100])


def test_failed_save_keeps_previous_index(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection in-process: the checksum step fails after the faiss file is written.
    path = _saved(tmp_path, data)
    idx = SearchIndex.load(path)
    idx.add_vectors(data["x"][200:300], data["texts"][200:300])

    def boom(_: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr("diffcse.search.index.sha256_file", boom)
    with pytest.raises(OSError, match="disk full"):
        idx.save()
    monkeypatch.undo()
    assert len(SearchIndex.load(path)) == 200
    assert not [p for p in path.iterdir() if p.name.startswith(".staging")]


def test_killed_save_keeps_previous_index(data: dict, tmp_path: Path) -> None:
    # A real crash: SIGKILL a process while it writes a new generation over an existing index.
    path = _saved(tmp_path, data, n=50)
    script = (
        "import numpy as np, faiss; faiss.omp_set_num_threads(1)\n"
        "from diffcse.search import SearchIndex\n"
        f"idx = SearchIndex.load({str(path)!r})\n"
        "x = np.random.default_rng(0).normal(size=(400_000, 32)).astype('float32')\n"
        "idx.add_vectors(x, ['t'] * len(x))\n"
        "print('saving', flush=True)\n"
        "idx.save()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.time() + 60
        while not any(p.name.startswith(".staging") for p in path.iterdir()):
            assert time.time() < deadline and proc.poll() is None, "save finished before it could be killed"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".staging") for p in path.iterdir())
    survivor = SearchIndex.load(path)
    assert len(survivor) == 50
    assert survivor.search_vectors(data["x"][7], top_k=1)[0][0].id == 7
    # The next save sweeps the dead process's staging dir.
    survivor.add_vectors(data["x"][50:60], data["texts"][50:60])
    survivor.save()
    assert not any(p.name.startswith(".staging") for p in path.iterdir())
    assert len([p for p in path.iterdir() if p.name.startswith("gen-")]) == 1
    assert len(SearchIndex.load(path)) == 60


def test_reader_retries_when_its_generation_was_swept(data: dict, tmp_path: Path) -> None:
    # Readers take no lock: a writer may publish a new generation and sweep the one a reader has
    # just read from the manifest. The reader must open the new one, not report it corrupt.
    from diffcse.search.index import _open_live

    path = _saved(tmp_path, data, n=50)
    seen = read_manifest(path)
    writer = SearchIndex.load(path)
    writer.add_vectors(data["x"][50:60], data["texts"][50:60])
    writer.save()
    assert not (path / seen.generation).exists()
    manifest, index, store, _ = _open_live(path, seen, verify=True)
    assert manifest.generation != seen.generation and index.ntotal == store.count() == 60
    store.close()
    # A generation that is still the live one but damaged is an error, not a retry loop.
    live = read_manifest(path)
    (path / live.generation / "index.faiss").write_bytes(b"")
    with pytest.raises(CorruptIndexError, match="index.faiss"):
        _open_live(path, live, verify=True)


def test_concurrent_searches_and_adds(data: dict) -> None:
    idx = SearchIndex.create(DIM, "hnsw")
    idx.add_vectors(data["x"][:1000], data["texts"][:1000])
    expected = [h.id for h in idx.search_vectors(data["q"][0], top_k=5)[0]]
    errors: list[BaseException] = []
    new_ids: list[int] = []

    def searcher() -> None:
        try:
            for _ in range(30):
                got = [h.id for h in idx.search_vectors(data["q"][0], top_k=5, ef_search=200)[0]]
                # Added vectors are far from q[0] (negated), so the top-5 must not change.
                assert got == expected
        except BaseException as err:  # noqa: BLE001 - reported to the main thread
            errors.append(err)

    def adder(k: int) -> None:
        try:
            rows = slice(1000 + 50 * k, 1050 + 50 * k)
            new_ids.extend(idx.add_vectors(-np.abs(data["x"][rows]) * np.sign(data["q"][0]), data["texts"][rows]))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(4)] + [threading.Thread(target=adder, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(new_ids) == list(range(1000, 1200)) and len(idx) == 1200


def test_rwlock_readers_share_writers_exclude() -> None:
    lock = RWLock()
    inside: list[str] = []
    peak = {"readers": 0, "mixed": False}
    guard = threading.Lock()

    def enter(role: str) -> None:
        ctx = lock.read() if role == "r" else lock.write()
        with ctx:
            with guard:
                inside.append(role)
                peak["readers"] = max(peak["readers"], inside.count("r"))
                if "w" in inside and len(inside) > 1:
                    peak["mixed"] = True
            time.sleep(0.02)
            with guard:
                inside.remove(role)

    threads = [threading.Thread(target=enter, args=(r,)) for r in "rrrrwrrwrr"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak["readers"] >= 2 and not peak["mixed"]
