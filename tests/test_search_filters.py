"""Metadata filters (`where`): applied inside faiss, equal to brute force over the matching subset for every kind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.search import FilterError, SearchIndex  # noqa: E402
from diffcse.search.filters import compile_where  # noqa: E402

faiss.omp_set_num_threads(1)
DIM = 16
N = 1200
# "ivfpq+rescore": IVF-PQ ranking candidates that its exact vectors (on disk) re-score.
KINDS = ("flat", "ivf", "hnsw", "ivfpq", "ivfsq8", "ivfpq+rescore")
PARAMS = {"flat": {}, "ivf": {"nlist": 16}, "hnsw": {}, "ivfpq": {"nlist": 8, "m": 8}, "ivfsq8": {"nlist": 8},
          "ivfpq+rescore": {"nlist": 8, "m": 8, "rescore": 20}}
# Settings that make the approximate kinds exhaustive on N vectors: every inverted list probed; an
# HNSW beam as wide as the index. IVF-PQ and IVF-SQ8 are then exact over their own (decoded) vectors.
EXACT = {"flat": {}, "ivf": {"nprobe": 16}, "hnsw": {"ef_search": N}, "ivfpq": {"nprobe": 8}, "ivfsq8": {"nprobe": 8},
         "ivfpq+rescore": {"nprobe": 8}}
# Kinds that score with decoded (lossy) vectors: equal decoded scores may come in either order.
DECODED = ("ivfpq", "ivfsq8")


def _meta(rng: np.random.Generator, i: int) -> dict | None:
    """Metadata of row i: a language, a year, a score, a flag, a nested source; some rows lack fields or all."""
    if i % 50 == 0:
        return None
    meta = {"lang": str(rng.choice(["en", "de", "fr"])), "score": float(rng.random()), "flag": bool(i % 3 == 0),
            "src": {"site": "a" if i % 4 else "b"}}
    if i % 7:
        meta["year"] = int(rng.integers(1990, 2020))
    if i % 11 == 0:
        meta["year"] = str(meta.get("year", 2000))  # a string "2000" must not equal the number 2000
    return meta


@pytest.fixture(scope="module")
def data() -> dict:
    """Vectors, queries and metadata (as given, for the numpy reference)."""
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(12, DIM))
    x = (centers[rng.integers(0, 12, N)] + 0.5 * rng.normal(size=(N, DIM))).astype(np.float32)
    q = (centers[rng.integers(0, 12, 6)] + 0.5 * rng.normal(size=(6, DIM))).astype(np.float32)
    meta = [_meta(rng, i) for i in range(N)]
    return {"x": x, "q": q, "meta": meta}


@pytest.fixture(scope="module")
def built(data: dict) -> dict[str, SearchIndex]:
    """One index per kind over the same rows (ids = row numbers)."""
    out = {}
    for kind in KINDS:
        idx = SearchIndex.create(DIM, kind.split("+")[0], PARAMS[kind])
        idx.add_vectors(data["x"], [f"doc {i}" for i in range(N)], data["meta"])
        out[kind] = idx
    return out


def stored_vectors(idx: SearchIndex, x: np.ndarray) -> np.ndarray:
    """What the index scores against: the normalised vectors, or the decoded ones of IVF-PQ/SQ8 (ADC = q . decoded)."""
    if idx.kind not in DECODED or idx.manifest.params.get("rescore"):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    ivf = faiss.clone_index(idx._index)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return np.stack([ivf.reconstruct(i) for i in range(len(x))])


def field(meta: dict | None, path: str) -> object:
    """A dotted field of a metadata dict, or a sentinel when absent."""
    value: object = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


MISSING = object()


def is_num(v: object) -> bool:
    """A JSON number (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# (where, the same condition in Python): equality, in, ranges, ne, nested, boolean, combined.
CONDITIONS: list[tuple[dict, Callable[[dict | None], bool]]] = [
    ({"lang": "de"}, lambda m: field(m, "lang") == "de"),
    ({"lang": {"in": ["en", "fr"]}}, lambda m: field(m, "lang") in ("en", "fr")),
    ({"year": {"gte": 2000, "lt": 2010}}, lambda m: is_num(y := field(m, "year")) and 2000 <= y < 2010),
    ({"score": {"gt": 0.25, "lte": 0.5}, "lang": "en"},
     lambda m: is_num(s := field(m, "score")) and 0.25 < s <= 0.5 and field(m, "lang") == "en"),
    ({"year": 2000}, lambda m: is_num(field(m, "year")) and field(m, "year") == 2000),
    ({"year": "2000"}, lambda m: field(m, "year") == "2000"),
    ({"flag": True}, lambda m: field(m, "flag") is True),
    ({"src.site": "b", "year": {"ne": 1995}}, lambda m: field(m, "src.site") == "b" and field(m, "year") != 1995),
    ({"lang": {"ne": "en"}}, lambda m: field(m, "lang") != "en"),
    ({"year": {"in": [1991, "2000", 2005.0]}},
     lambda m: (is_num(y := field(m, "year")) and y in (1991, 2005)) or field(m, "year") == "2000"),
]


def brute_force(vectors: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and scores over the rows in mask, by inner product with the normalised queries."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sub = np.flatnonzero(mask)
    sims = qn @ vectors[sub].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return sub[order], np.take_along_axis(sims, order, axis=1)


@pytest.mark.parametrize("kind", KINDS)
def test_filtered_search_equals_brute_force_over_the_matches(built: dict, data: dict, kind: str) -> None:
    idx = built[kind]
    vectors = stored_vectors(idx, data["x"])
    for where, pred in CONDITIONS:
        mask = np.array([pred(m) for m in data["meta"]])
        assert 10 < mask.sum() < N, (where, mask.sum())  # each condition selects a real subset
        res = idx.search_vectors(data["q"], top_k=10, where=where, **EXACT[kind])
        want_ids, want_scores = brute_force(vectors, data["q"], mask, 10)
        got_ids = np.array([[h.id for h in row] for row in res])
        got_scores = np.array([[h.score for h in row] for row in res])
        assert got_ids.shape == want_ids.shape, where
        assert mask[got_ids].all(), where
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-4, err_msg=str(where))
        if kind in DECODED:
            # Decoded vectors collide: equal scores may come in either order, so compare ranks
            # only where the reference's scores are apart by more than float32 summation noise.
            distinct = np.abs(np.diff(want_scores, axis=1)) > 1e-4
            apart = np.concatenate([distinct[:, :1], distinct[:, 1:] & distinct[:, :-1], distinct[:, -1:]], axis=1)
            assert (got_ids[apart] == want_ids[apart]).all(), where
        else:
            np.testing.assert_array_equal(got_ids, want_ids, err_msg=str(where))
        for row in res:
            for hit in row:
                assert hit.metadata == data["meta"][hit.id] and hit.text == f"doc {hit.id}"


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_is_filled_from_the_matches_at_default_settings(built: dict, data: dict, kind: str) -> None:
    # A selective filter (~2% of rows) at the kind's default nprobe / ef: the filter is inside the
    # search, so every query still gets top_k matching hits, not the few left after cutting.
    where = {"lang": "fr", "year": {"gte": 2016}}
    mask = np.array([field(m, "lang") == "fr" and is_num(y := field(m, "year")) and y >= 2016 for m in data["meta"]])
    assert 20 <= mask.sum() <= 80
    res = built[kind].search_vectors(data["q"], top_k=15, where=where)
    assert [len(row) for row in res] == [15] * len(data["q"])
    assert all(mask[h.id] for row in res for h in row)
    # Fewer matches than top_k: all of them, and nothing else.
    few = {"lang": "fr", "year": {"gte": 2019}}
    n_few = sum(1 for m in data["meta"] if field(m, "lang") == "fr" and is_num(y := field(m, "year")) and y >= 2019)
    assert 0 < n_few < 15
    assert {len(row) for row in built[kind].search_vectors(data["q"], top_k=15, where=few)} == {n_few}


@pytest.mark.parametrize("kind", KINDS)
def test_a_selective_filter_returns_every_match_in_order(built: dict, data: dict, kind: str) -> None:
    # Under 1% of the rows match: at default settings every kind returns all of them, by score
    # (IVF widens nprobe until it has them; HNSW scores them exactly from its flat storage).
    where = {"score": {"lt": 0.008}}
    mask = np.array([is_num(s := field(m, "score")) and s < 0.008 for m in data["meta"]])
    assert 3 <= mask.sum() < N // 100
    want_ids, want_scores = brute_force(stored_vectors(built[kind], data["x"]), data["q"], mask, 20)
    res = built[kind].search_vectors(data["q"], top_k=20, where=where)
    np.testing.assert_allclose([[h.score for h in row] for row in res], want_scores, atol=1e-4)
    if kind not in DECODED:
        np.testing.assert_array_equal([[h.id for h in row] for row in res], want_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_no_match_gives_empty_results(built: dict, data: dict, kind: str) -> None:
    for where in ({"lang": "xx"}, {"year": {"gt": 2100}}, {"lang": "en", "flag": {"in": ["yes"]}}):
        assert built[kind].search_vectors(data["q"][:2], top_k=5, where=where) == [[], []]
    # {} and None are "no filter".
    assert built[kind].search_vectors(data["q"][:1], top_k=3, where={}) == built[kind].search_vectors(data["q"][:1], top_k=3)


def test_filters_skip_deleted_rows_and_survive_save_load(data: dict, tmp_path: Path) -> None:
    for kind in ("flat", "hnsw"):
        idx = SearchIndex.create(DIM, kind)
        idx.add_vectors(data["x"][:400], [f"doc {i}" for i in range(400)], data["meta"][:400])
        where = {"lang": "de"}
        first = idx.search_vectors(data["q"], top_k=5, where=where, ef_search=400)
        gone = {h.id for row in first for h in row}
        assert idx.delete(sorted(gone)) == len(gone)
        idx.save(tmp_path / kind)
        loaded = SearchIndex.load(tmp_path / kind)
        mask = np.array([field(m, "lang") == "de" for m in data["meta"][:400]])
        mask[sorted(gone)] = False
        want, _ = brute_force(stored_vectors(loaded, data["x"][:400]), data["q"], mask, 5)
        got = loaded.search_vectors(data["q"], top_k=5, where=where, ef_search=400)
        np.testing.assert_array_equal([[h.id for h in row] for row in got], want)
        loaded.close()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"year": {"between": [1, 2]}}, r"condition on 'year': unknown operator 'between' \(known: eq, ne, in"),
        ({"year; DROP TABLE items": 1}, r"field 'year; DROP TABLE items' is not a field name"),
        ({"$.lang": "en"}, r"field '\$\.lang' is not a field name"),
        ({"": "en"}, r"field '' is not a field name"),
        ({"year": {"gt": True}}, r"condition on 'year': gt needs a number or a string, got a boolean"),
        ({"lang": None}, r"condition on 'lang': eq value must be a string, number or boolean, got null"),
        ({"lang": {"in": []}}, r"condition on 'lang': 'in' needs a non-empty list"),
        ({"lang": {"in": "en"}}, r"condition on 'lang': 'in' needs a non-empty list"),
        ({"lang": {}}, r"condition on 'lang': empty operator object"),
        ({"lang": {"en": 1}}, r"condition on 'lang': unknown operator 'en'"),
        ({"year": {"lt": float("nan")}}, r"condition on 'year': lt value nan is not a finite number"),
        ({"year": 2**70}, r"condition on 'year': eq value \d+ is outside the 64-bit integer range"),
        ({"lang": ["en", "de"]}, r"condition on 'lang': eq value must be a string, number or boolean, got list"),
        ({"lang": "\ud800"}, r"condition on 'lang': eq value is not valid Unicode"),
        (["lang", "en"], r"where must be an object of field: condition, got list"),
        ({f"f{i}": 1 for i in range(40)}, r"where has 40 fields; at most 32"),
    ],
)
def test_bad_conditions_are_clear_errors(built: dict, data: dict, where: object, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        built["flat"].search_vectors(data["q"][:1], where=where)


def test_sql_is_parameterised() -> None:
    # Values and JSON paths are bound parameters: a quote in a value is data, not SQL.
    compiled = compile_where({"lang": "en' OR 1=1 --", "year": {"gte": 2000}})
    assert "'en" not in compiled.sql and "2000" not in compiled.sql and "lang" not in compiled.sql
    assert "en' OR 1=1 --" in compiled.params and "$.lang" in compiled.params and 2000 in compiled.params
    idx = SearchIndex.create(4, "flat")
    idx.add_vectors(np.eye(4), ["a", "b", "c", "d"], [{"lang": "en"}, {"lang": "en' OR 1=1 --"}, None, {}])
    assert [h.text for h in idx.search_vectors(np.ones(4), top_k=4, where={"lang": "en' OR 1=1 --"})[0]] == ["b"]


def test_cli_where_and_its_errors(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs = tmp_path / "docs.jsonl"
    rows = [{"text": f"sentence number {i} about a dog", "metadata": {"lang": ["en", "de"][i % 2], "year": 2000 + i}}
            for i in range(30)]
    docs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(docs), "--index-dir", idx,
                 "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["search", "--index-dir", idx, "--query", "a dog", "--top-k", "20", "--json", "--threads", "1",
                 "--where", '{"lang": "de"}', "--where", '{"year": {"gte": 2010}}']) == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert sorted(h["metadata"]["year"] for h in hits) == [2011, 2013, 2015, 2017, 2019, 2021, 2023, 2025, 2027, 2029]
    for where, needle in (('{"year": {"between": 1}}', "unknown operator 'between'"), ("{lang: en}", "--where"),
                          ('["lang"]', "expected a JSON object"), ('{"lang": "de"}', "given twice")):
        extra = ["--where", '{"lang": "en"}'] if "twice" in needle else []
        assert main(["search", "--index-dir", idx, "--query", "a dog", "--where", where, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_cached_filter_results_follow_every_write(data: dict) -> None:
    # The ids a filter selects are cached between writes: an add, an upsert or a delete must
    # be seen by the very next filtered search, and a failed write must not poison the cache.
    idx = SearchIndex.create(DIM, "flat")
    idx.add_vectors(data["x"][:200], [f"doc {i}" for i in range(200)], data["meta"][:200])
    where = {"lang": "fr"}
    french = {i for i, m in enumerate(data["meta"][:200]) if field(m, "lang") == "fr"}

    def found() -> set[int]:
        return {h.id for h in idx.search_vectors(data["q"][:1], top_k=200, where=where)[0]}

    assert found() == french
    assert found() == french  # served from the cache
    new = idx.add_vectors(data["x"][200:202], ["new a", "new b"], [{"lang": "fr"}, {"lang": "en"}])
    assert found() == french | {new[0]}
    gone = sorted(french)[:3]
    assert idx.delete(gone) == 3
    assert found() == (french | {new[0]}) - set(gone)
    res = idx.upsert_vectors(["u"], data["x"][203:204], ["upserted"], [{"lang": "fr"}])
    assert found() == (french | {new[0], res.ids[0]}) - set(gone)
    idx.upsert_vectors(["u"], data["x"][204:205], ["now english"], [{"lang": "en"}])
    assert found() == (french | {new[0]}) - set(gone)


@pytest.mark.parametrize("ids", [[], [0], [3, 8, 9, 15, 16, 1000], list(range(0, 5000, 7)), [5, 2**40, 2**52]])
def test_the_selector_of_a_filter_admits_exactly_its_ids(ids: list[int]) -> None:
    # Small id ranges get a bitmap, sparse huge ones a hash set: both must admit exactly the ids.
    from diffcse.search.index import id_selector

    allowed = id_selector(np.asarray(ids, dtype=np.int64))
    assert (allowed.bitmap is None) == (bool(ids) and ids[-1] >= 2**40)
    probe = sorted(set(ids) | {0, 1, 2, 7, 8, 17, 999, 1001, 4999, 5005, 2**40 - 1, 2**40 + 1, 2**53})
    assert {i for i in probe if allowed.selector.is_member(i)} == set(ids)
