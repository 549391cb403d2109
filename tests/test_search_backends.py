"""One behavioural suite for every search backend: faiss (SearchIndex, kind flat) and Milvus (MilvusIndex on Milvus Lite).

Each test runs against both; the reference is numpy brute force over a model of what was stored
(vectors, texts, metadata, doc ids), with `where` conditions written out in plain Python.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcse.search import (  # noqa: E402
    EmptyQueryError,
    FilterError,
    IndexMismatchError,
    SearchIndex,
    SearchIndexError,
    SearchResult,
)

faiss.omp_set_num_threads(1)
BACKENDS = ("faiss", "milvus")
DIM = 16
N = 400
K = 10
# Cosines from faiss, Milvus and numpy (all float32) agree to rounding.
ATOL = 1e-5
TRICKY_TEXT = 'say "hi" \\ then\nnewline \u00e9\u4e2d'

Index = Any  # SearchIndex or MilvusIndex: the same methods


class Backend:
    """Makes empty indexes of one backend and reopens them from what they persisted."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder
        self._made = 0

    def create(self, dim: int = DIM, encoder: object = None) -> Index:
        """An empty index (Milvus: a new Milvus Lite data path, so the engine starts here)."""
        self._made += 1
        if self.name == "faiss":
            return SearchIndex.create(dim, "flat", encoder=encoder)
        from diffcse.search.milvus import MilvusIndex

        return MilvusIndex.create(dim, str(self.folder / f"milvus-{self._made}.db"), encoder=encoder)

    def reopen(self, idx: Index) -> Index:
        """Persist and close idx, then open it again from disk (faiss: save/load; Milvus: a restarted engine)."""
        if self.name == "faiss":
            path = self.folder / f"faiss-{self._made}"
            idx.save(path)
            idx.close()
            return SearchIndex.load(path)
        from diffcse.search.milvus import MilvusIndex

        uri, collection = idx._uri, idx._collection
        idx.close()
        return MilvusIndex.open(uri, collection)


def _backend(name: str, folder: Path) -> Backend:
    """A backend, skipped when its engine is not installed."""
    if name == "milvus":
        pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
    return Backend(name, folder)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn, writing under this test's tmp_path."""
    return _backend(request.param, tmp_path)


# --------------------------------------------------------------------- the reference


MISSING = object()


def field(meta: dict | None, path: str) -> object:
    """A dotted field of a metadata dict, or MISSING."""
    value: object = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def family(value: object) -> str:
    """The JSON type family a filter compares within: bool, number, text or other."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "text" if isinstance(value, str) else "other"


def eq(meta: dict | None, path: str, target: object) -> bool:
    """The field holds target with the same JSON type (the string "2000" is not 2000, true is not 1)."""
    value = field(meta, path)
    return family(value) == family(target) and value == target


def rng_(meta: dict | None, path: str, test: Callable[[Any], bool], kind: str) -> bool:
    """The field is of family kind and passes test (ranges skip other types)."""
    value = field(meta, path)
    return family(value) == kind and test(value)


def make_meta(rng: np.random.Generator, i: int) -> dict | None:
    """Row i's metadata: languages, years (some strings, some floats, some missing), booleans next to 1s, nesting."""
    if i % 37 == 0:
        return None
    if i % 41 == 0:
        return {}
    meta: dict = {"lang": str(rng.choice(["en", "de", "fr"])), "score": float(rng.random()), "flag": bool(i % 3 == 0),
                  "src": {"site": "a" if i % 4 else "b"}}
    if i % 7:
        meta["year"] = int(rng.integers(1990, 2020))
    if i % 11 == 0:
        meta["year"] = str(meta.get("year", 2000))  # a string "2000" must not equal the number 2000
    if i % 13 == 0:
        meta["year"] = 2000.0  # the float 2000.0 does equal 2000
    # A value that is true, 1, 1.0, "1" or a list: equality must tell them apart.
    meta["one"] = [True, 1, 1.0, "1", [1], False, 0][i % 7]
    if i % 17 == 0:
        meta["src"] = "b"  # a string where other rows have an object
    if i % 19 == 0:
        meta["note"] = TRICKY_TEXT
    return meta


# (where, the same condition in Python): equality, in, ranges, ne, nested, typed, missing, escaping.
CONDITIONS: list[tuple[dict, Callable[[dict | None], bool]]] = [
    ({"lang": "de"}, lambda m: eq(m, "lang", "de")),
    ({"lang": {"in": ["en", "fr"]}}, lambda m: eq(m, "lang", "en") or eq(m, "lang", "fr")),
    ({"year": {"gte": 2000, "lt": 2010}}, lambda m: rng_(m, "year", lambda y: 2000 <= y < 2010, "number")),
    ({"score": {"gt": 0.25, "lte": 0.5}, "lang": "en"},
     lambda m: rng_(m, "score", lambda s: 0.25 < s <= 0.5, "number") and eq(m, "lang", "en")),
    ({"year": 2000}, lambda m: eq(m, "year", 2000)),
    ({"year": "2000"}, lambda m: eq(m, "year", "2000")),
    ({"year": {"in": [1991, "2000", 2005.0]}},
     lambda m: eq(m, "year", 1991) or eq(m, "year", "2000") or eq(m, "year", 2005)),
    ({"year": {"in": [*range(1990, 2020, 3), 2004.0, "2000", "1999"]}},
     lambda m: any(eq(m, "year", y) for y in [*range(1990, 2020, 3), 2004, "2000", "1999"])),
    ({"one": True}, lambda m: eq(m, "one", True)),
    ({"one": 1}, lambda m: eq(m, "one", 1)),
    ({"one": {"in": [0, "1"]}}, lambda m: eq(m, "one", 0) or eq(m, "one", "1")),
    ({"one": {"gte": 1}}, lambda m: rng_(m, "one", lambda v: v >= 1, "number")),
    ({"flag": False, "one": {"ne": True}}, lambda m: eq(m, "flag", False) and not eq(m, "one", True)),
    ({"src.site": "b", "year": {"ne": 1995}}, lambda m: eq(m, "src.site", "b") and not eq(m, "year", 1995)),
    ({"src": "b"}, lambda m: eq(m, "src", "b")),
    ({"src.site": {"ne": "a"}}, lambda m: not eq(m, "src.site", "a")),
    ({"src": {"ne": "b"}, "one": {"in": [True, 1.0]}},
     lambda m: not eq(m, "src", "b") and (eq(m, "one", True) or eq(m, "one", 1))),
    ({"lang": {"ne": "en"}}, lambda m: not eq(m, "lang", "en")),
    ({"lang": {"gt": "df", "lte": "fr"}}, lambda m: rng_(m, "lang", lambda s: "df" < s <= "fr", "text")),
    ({"note": TRICKY_TEXT}, lambda m: eq(m, "note", TRICKY_TEXT)),
    ({"absent": 1}, lambda m: False),
    ({"absent": {"ne": 1}, "lang": "fr"}, lambda m: eq(m, "lang", "fr")),
]


def brute_force(x: np.ndarray, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k row numbers and cosines among rows, for each query."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qn @ xn[rows].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return rows[order], np.take_along_axis(sims, order, axis=1)


def check_hits(hits: list[SearchResult], x: np.ndarray, q: np.ndarray, rows: np.ndarray, k: int,
               what: str, threshold: float | None = None) -> None:
    """hits (ids = row numbers) are the top-k of rows for query q: same count, same scores rank by rank, each score its row's cosine."""
    ref_ids, ref_scores = brute_force(x, q[None], rows, k)
    ref_ids, ref_scores = ref_ids[0], ref_scores[0]
    if threshold is not None:
        keep = ref_scores >= threshold
        ref_ids, ref_scores = ref_ids[keep], ref_scores[keep]
    got = np.array([h.score for h in hits], dtype=np.float64)
    assert len(hits) == len(ref_ids), f"{what}: {len(hits)} hits, expected {len(ref_ids)}"
    np.testing.assert_allclose(got, ref_scores, atol=ATOL, err_msg=what)
    allowed = set(rows.tolist())
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q)
    for h in hits:
        assert h.id in allowed, f"{what}: id {h.id} does not pass the filter"
        assert math.isclose(h.score, float(xn[h.id] @ qn), abs_tol=ATOL), what
    if not hits:
        return
    # Near-ties (within rounding) may come in either order; elsewhere the ids must be the same.
    gaps = np.abs(np.diff(ref_scores)) > 10 * ATOL
    distinct = np.concatenate([[True], gaps]) & np.concatenate([gaps, [True]])
    assert [h.id for h, d in zip(hits, distinct, strict=True) if d] == ref_ids[distinct].tolist(), what


# --------------------------------------------------------------------- filtered search


@pytest.fixture(scope="module")
def data() -> dict:
    """Clustered vectors, queries and metadata (row i gets id i)."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(12, DIM))
    x = (centers[rng.integers(0, 12, N)] + 0.5 * rng.normal(size=(N, DIM))).astype(np.float32)
    q = (centers[rng.integers(0, 12, 4)] + 0.5 * rng.normal(size=(4, DIM))).astype(np.float32)
    return {"x": x, "q": q, "meta": [make_meta(rng, i) for i in range(N)]}


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data: dict) -> Iterator[Index]:
    """One index per backend holding the N rows, shared by the read-only tests."""
    backend = _backend(request.param, tmp_path_factory.mktemp(request.param))
    idx = backend.create()
    ids = idx.add_vectors(data["x"], [f"doc {i}" for i in range(N)], data["meta"])
    assert ids == list(range(N))
    yield idx
    idx.close()


def test_filtered_search_equals_brute_force_over_the_matching_subset(filled: Index, data: dict) -> None:
    """Every condition: the top k among matching rows only (filled from matches), as numpy ranks them."""
    x, q, meta = data["x"], data["q"], data["meta"]
    selective = 0
    for where, ref in CONDITIONS:
        rows = np.array([i for i in range(N) if ref(meta[i])], dtype=np.int64)
        if K < len(rows) < N // 5:
            selective += 1  # a search that filtered after taking the top k would come up short here
        results = filled.search_vectors(q, top_k=K, where=where)
        assert len(results) == len(q)
        for j, hits in enumerate(results):
            check_hits(hits, x, q[j], rows, K, f"where={where} query {j}")
            for h in hits:
                assert (h.text, h.metadata, h.doc_id) == (f"doc {h.id}", meta[h.id], None)
    assert selective >= 3


def test_threshold_and_top_k(filled: Index, data: dict) -> None:
    """threshold drops hits below it after the top k; a top_k past the matches returns every match."""
    x, q, meta = data["x"], data["q"], data["meta"]
    everything = np.arange(N)
    for threshold in (0.0, 0.5, 0.95):
        for j, hits in enumerate(filled.search_vectors(q, top_k=50, threshold=threshold)):
            assert all(h.score >= threshold for h in hits)
            check_hits(hits, x, q[j], everything, 50, f"threshold {threshold} query {j}", threshold)
    where = {"year": "2000"}
    rows = np.array([i for i in range(N) if eq(meta[i], "year", "2000")])
    assert 0 < len(rows) < 100
    for j, hits in enumerate(filled.search_vectors(q, top_k=100, where=where)):
        check_hits(hits, x, q[j], rows, 100, f"all matches, query {j}")
    # One query vector (1-D) gives one list too.
    check_hits(filled.search_vectors(q[0], top_k=3)[0], x, q[0], everything, 3, "1-D query")


# --------------------------------------------------------------------- writes


class Model:
    """What an index should hold: internal id -> (vector, text, metadata, doc id)."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[np.ndarray, str, dict | None, str | None]] = {}

    def check(self, idx: Index, q: np.ndarray) -> None:
        """Counts, documents and a full search agree with the model."""
        assert len(idx) == len(self.rows)
        docs = {row[3]: i for i, row in self.rows.items() if row[3] is not None}
        got = idx.get_docs(list(docs) + ["never-upserted"])
        assert {d: r.id for d, r in got.items()} == docs
        for doc, res in got.items():
            _, text, meta, _ = self.rows[docs[doc]]
            assert (res.text, res.metadata, res.doc_id) == (text, meta, doc)
        ids = np.array(sorted(self.rows), dtype=np.int64)
        # Rows of ids not stored stay ones: never searched, but normalisable.
        x = np.ones((int(ids.max()) + 1 if len(ids) else 1, q.shape[1]), dtype=np.float32)
        for i in ids:
            x[i] = self.rows[int(i)][0]
        hits = idx.search_vectors(q, top_k=len(ids) + 5)[0] if len(ids) else []
        if len(ids):
            check_hits(hits, x, q[0], ids, len(ids) + 5, "search over everything")
        for h in hits:
            _, text, meta, doc = self.rows[h.id]
            assert (h.text, h.metadata, h.doc_id) == (text, meta, doc)


def vecs(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """n random vectors."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_add_upsert_delete_round_trip(backend: Backend) -> None:
    """Ids in order and never reused; upsert replaces under a new id; deletes are gone from counts, documents and search."""
    idx = backend.create()
    model = Model()
    q = vecs(1, 99)
    assert len(idx) == 0 and idx.search_vectors(q, top_k=3) == [[]] and idx.get_docs(["a"]) == {}
    x = vecs(12, 1)
    metas = [{"n": i, "tag": "even" if i % 2 == 0 else "odd"} if i % 5 else None for i in range(12)]
    ids = idx.add_vectors(x, [f"text {i}" for i in range(12)], metas)
    assert ids == list(range(12))
    model.rows.update({i: (x[i], f"text {i}", metas[i], None) for i in ids})
    model.check(idx, q)

    odd_doc = 'web "1" \\ \n x'  # quotes, backslash, newline: must survive any query language
    y = vecs(4, 2)
    res = idx.upsert_vectors([odd_doc, "b", "c", odd_doc], y, ["A", "B", "C", "A again"], [{"v": 1}, None, {}, {"v": 2}])
    assert (res.added, res.replaced) == (3, 0)
    assert res.ids[0] == res.ids[3] and len(set(res.ids)) == 3 and min(res.ids) >= 12
    model.rows.update({res.ids[1]: (y[1], "B", None, "b"), res.ids[2]: (y[2], "C", {}, "c"),
                       res.ids[3]: (y[3], "A again", {"v": 2}, odd_doc)})
    model.check(idx, q)

    z = vecs(3, 3)
    before = max(model.rows)
    res2 = idx.upsert_vectors(["b", "new", odd_doc], z, ["B2", "N", "A3"], [{"v": 3}, None, None])
    assert (res2.added, res2.replaced) == (1, 2)
    assert min(res2.ids) > before  # a replaced document gets a new id; the old one is gone
    for old in (res.ids[1], res.ids[3]):
        del model.rows[old]
    model.rows.update({res2.ids[0]: (z[0], "B2", {"v": 3}, "b"), res2.ids[1]: (z[1], "N", None, "new"),
                       res2.ids[2]: (z[2], "A3", None, odd_doc)})
    model.check(idx, q)

    assert idx.delete([3, 4, 3, 10**6]) == 2  # unknown ids are ignored, repeats count once
    assert idx.delete([3]) == 0
    del model.rows[3], model.rows[4]
    assert idx.delete_ids(["c", "never", "c"]) == 1
    del model.rows[res.ids[2]]
    assert idx.delete([res2.ids[1]]) == 1  # an upserted document deleted by its internal id
    del model.rows[res2.ids[1]]
    model.check(idx, q)
    assert idx.get_docs(["c", "new"]) == {}

    new = idx.add_vectors(vecs(2, 4), ["p", "q"])
    assert new == [max(res2.ids) + 1, max(res2.ids) + 2]
    assert idx.stats()["count"] == len(idx) == len(model.rows) + 2
    idx.close()


def test_persistence_round_trip(backend: Backend) -> None:
    """Closed and reopened: the same documents and results, and ids continue past every id issued (even deleted ones)."""
    idx = backend.create()
    x = vecs(30, 5)
    metas = [{"lang": "en" if i % 3 else "de", "year": 1990 + i} for i in range(30)]
    idx.add_vectors(x, [f"t{i}" for i in range(30)], metas)
    up = idx.upsert_vectors(["d1", "d2"], vecs(2, 6), ["D1", "D2"], [{"lang": "de"}, None])
    last = max(up.ids)
    assert idx.delete([last, 0]) == 2  # the highest id issued is deleted: it must not come back
    q = vecs(3, 7)
    where = {"lang": "de", "year": {"gte": 1995}}
    before = (idx.search_vectors(q, top_k=8), idx.search_vectors(q, top_k=8, where=where), idx.get_docs(["d1", "d2"]),
              len(idx))

    idx = backend.reopen(idx)
    after = (idx.search_vectors(q, top_k=8), idx.search_vectors(q, top_k=8, where=where), idx.get_docs(["d1", "d2"]),
             len(idx))
    assert after[2] == before[2] and after[3] == before[3] == 30
    for old_lists, new_lists in zip(before[:2], after[:2], strict=True):
        for old, new in zip(old_lists, new_lists, strict=True):
            assert [(h.id, h.text, h.metadata, h.doc_id) for h in new] == [(h.id, h.text, h.metadata, h.doc_id) for h in old]
            np.testing.assert_allclose([h.score for h in new], [h.score for h in old], atol=ATOL)
    assert idx.add_vectors(vecs(1, 8), ["later"]) == [last + 1]
    idx.close()


def test_bad_input_is_refused_and_changes_nothing(backend: Backend) -> None:
    """Wrong dimension, NaN, bad filters, bad ids and arguments: the same error types on every backend."""
    idx = backend.create()
    idx.add_vectors(vecs(3, 9), ["a", "b", "c"], [{"year": 2000}, None, {"year": "2000"}])
    with pytest.raises(IndexMismatchError, match="dimension"):
        idx.add_vectors(vecs(2, 1, dim=DIM + 1), ["x", "y"])
    with pytest.raises(IndexMismatchError, match="dimension"):
        idx.search_vectors(vecs(1, 1, dim=DIM - 1))
    bad = vecs(2, 2)
    bad[1, 3] = np.nan
    with pytest.raises(SearchIndexError, match="#1 contains NaN"):
        idx.add_vectors(bad, ["x", "y"])
    with pytest.raises(SearchIndexError, match="NaN"):
        idx.upsert_vectors(["u", "v"], bad, ["x", "y"])
    with pytest.raises(SearchIndexError, match="NaN"):
        idx.search_vectors(bad)
    with pytest.raises(EmptyQueryError):
        idx.search_vectors(np.zeros((1, DIM), np.float32))
    q = vecs(1, 3)
    with pytest.raises(FilterError, match="unknown operator 'between'"):
        idx.search_vectors(q, where={"year": {"between": [1, 2]}})
    for where in ({"year": {"gt": True}}, {"a b": 1}, {"year": {"in": []}}, {"year": None}, {"year": float("nan")}):
        with pytest.raises(FilterError):
            idx.search_vectors(q, where=where)
    for kwargs in ({"top_k": 0}, {"threshold": float("nan")}):
        with pytest.raises(SearchIndexError):
            idx.search_vectors(q, **kwargs)
    with pytest.raises(SearchIndexError, match="empty"):
        idx.upsert_vectors([" "], vecs(1, 4), ["x"])
    with pytest.raises(SearchIndexError, match="metadata #0"):
        idx.add_vectors(vecs(1, 4), ["x"], [{"v": float("inf")}])
    with pytest.raises(SearchIndexError, match="text #0 is empty"):
        idx.add_vectors(vecs(1, 4), ["  "])
    assert len(idx) == 3
    assert [h.id for h in idx.search_vectors(q, top_k=5, where={"year": 2000})[0]] == [0]
    idx.close()


def test_texts_through_the_encoder(backend: Backend, tiny_bert_dir: str) -> None:
    """add / upsert / search with texts: the attached encoder embeds them; a text finds itself first."""
    from diffcse import Encoder

    enc = Encoder.load(tiny_bert_dir)
    idx = backend.create(dim=enc.dim, encoder=enc)
    texts = ["a man plays guitar", "the dog eats bread", "two children read a book", "the city is big at night"]
    ids = idx.add(texts, [{"i": i} for i in range(4)])
    res = idx.upsert(["g"], ["a woman plays piano"], [{"i": 9}])
    hits = idx.search(["the dog eats bread", "a woman plays piano"], top_k=2)
    assert hits[0][0].id == ids[1] and hits[1][0].id == res.ids[0]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    one = idx.search("the dog eats bread", top_k=3, where={"i": {"gte": 2}})
    assert one and {h.id for h in one} <= {ids[2], ids[3], res.ids[0]}
    with pytest.raises(SearchIndexError, match="not one string"):
        idx.add("one string")
    idx.close()


# --------------------------------------------------------------------- Milvus specifics


@pytest.fixture()
def milvus(tmp_path: Path) -> Backend:
    """The Milvus backend alone."""
    return _backend("milvus", tmp_path)


def test_milvus_refuses_other_modes_and_existing_collections(milvus: Backend, tmp_path: Path) -> None:
    """Dense only; create() will not silently reuse a collection; open() of a missing one is a clear error."""
    from diffcse.search.milvus import MilvusEngineError, MilvusIndex

    idx = milvus.create()
    for mode in ("lexical", "hybrid"):
        with pytest.raises(SearchIndexError, match="supports mode 'dense' only"):
            idx.search("text", mode=mode)
    uri = idx._uri
    idx.add_vectors(vecs(2, 1), ["a", "b"])
    # A second index in the same Milvus Lite data path; closing one leaves the other's engine up.
    other = MilvusIndex.create(DIM, uri, collection="other")
    with pytest.raises(SearchIndexError, match="already exists"):
        MilvusIndex.create(DIM, uri)
    other.close()
    assert len(idx) == 2
    idx.close()
    fresh = MilvusIndex.create(DIM, uri, overwrite=True)
    assert len(fresh) == 0
    with pytest.raises(SearchIndexError, match="no diffcse index 'missing'"):
        MilvusIndex.open(uri, "missing")
    with pytest.raises(SearchIndexError, match="collection must be"):
        MilvusIndex.open(uri, "bad-name")
    with pytest.raises(SearchIndexError, match=r"must end in '\.db'"):
        MilvusIndex.create(DIM, str(tmp_path / "no-suffix"))
    fresh.close()
    with pytest.raises(SearchIndexError, match="closed"):
        len(fresh)
    with pytest.raises(MilvusEngineError, match="could not connect"):
        MilvusIndex.open("http://127.0.0.1:9", timeout=2)
