"""Lexical (SQLite FTS5, BM25) and hybrid (reciprocal rank fusion) search, and the format-1 -> 2 upgrade."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import sentences  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.core.encoder import Encoder  # noqa: E402
from diffcse.core.io import sha256_file  # noqa: E402
from diffcse.search import CorruptIndexError, SearchIndex, SearchIndexError, read_manifest  # noqa: E402
from diffcse.search.manifest import MANIFEST_NAME  # noqa: E402

faiss.omp_set_num_threads(1)
# A long everyday sentence ending in a made-up word: its mean-pooled vector is the everyday words'.
RARE = "the old man reads the news in the city park every day with his dog and his cat zk7"
TEXTS = sentences(151, seed=4) + [RARE]
QUERIES = ["a man plays guitar", "the dog runs in the park", TEXTS[5], "zk7"]
DEPTH = 50


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: str) -> Encoder:
    """The tiny random BERT, mean pooling."""
    return Encoder.load(tiny_bert_dir, pooler="avg")


@pytest.fixture(scope="module")
def index(encoder: Encoder) -> SearchIndex:
    """An exact (flat) index of TEXTS with a group number in the metadata."""
    return SearchIndex.build(encoder, TEXTS, kind="flat", metadata=[{"g": i % 3} for i in range(len(TEXTS))])


@pytest.fixture(scope="module")
def corpus_vectors(encoder: Encoder) -> np.ndarray:
    """Normalised vectors of TEXTS, for the numpy reference."""
    return encoder.encode(TEXTS, normalize=True)


def dense_ranking(encoder: Encoder, corpus: np.ndarray, query: str, allowed: list[int]) -> list[int]:
    """Ids of `allowed` by cosine with the query, best first (numpy, not faiss)."""
    sims = corpus[allowed] @ encoder.encode([query], normalize=True)[0]
    return [allowed[j] for j in np.argsort(-sims, kind="stable")]


def bm25_ranking(query: str, allowed: list[int]) -> list[int]:
    """Ids of the texts by SQLite's own bm25() on a separate in-memory FTS5 table of the same texts."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(text)")
    conn.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)", enumerate(TEXTS))
    words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
    match = " OR ".join(f'"{w}"' for w in words)
    rows = conn.execute("SELECT rowid FROM t WHERE t MATCH ? ORDER BY bm25(t), rowid", (match,)).fetchall()
    keep = set(allowed)
    return [r[0] for r in rows if r[0] in keep]


def rrf_by_hand(dense: list[int], lexical: list[int], top_k: int, k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion written out: score = 1/(k + dense rank) + 1/(k + BM25 rank), ranks from 1."""
    docs = set(dense) | set(lexical)
    score = {d: (1 / (k + dense.index(d) + 1) if d in dense else 0.0) + (1 / (k + lexical.index(d) + 1) if d in lexical else 0.0)
             for d in docs}
    best = {d: min(lst.index(d) + 1 for lst in (dense, lexical) if d in lst) for d in docs}
    return sorted(score.items(), key=lambda item: (-item[1], best[item[0]], item[0]))[:top_k]


@pytest.mark.parametrize("where", [None, {"g": 1}])
def test_hybrid_equals_hand_computed_rrf(
    index: SearchIndex, encoder: Encoder, corpus_vectors: np.ndarray, where: dict | None
) -> None:
    allowed = [i for i in range(len(TEXTS)) if where is None or i % 3 == 1]
    for query in QUERIES:
        dense = dense_ranking(encoder, corpus_vectors, query, allowed)[:DEPTH]
        lexical = bm25_ranking(query, allowed)[:DEPTH]
        assert lexical, query  # every query shares words with the corpus: both lists take part
        # The index's own lists agree with the references...
        assert [h.id for h in index.search(query, top_k=DEPTH, where=where)] == dense
        assert [h.id for h in index.search(query, top_k=DEPTH, where=where, mode="lexical")] == lexical
        # ...and the fusion is the arithmetic above.
        want = rrf_by_hand(dense, lexical, top_k=10)
        got = index.search(query, top_k=10, where=where, mode="hybrid")
        assert [h.id for h in got] == [d for d, _ in want], query
        np.testing.assert_allclose([h.score for h in got], [s for _, s in want], rtol=1e-12)
        assert all(h.text == TEXTS[h.id] for h in got)
    # A different k and depth, and a dense threshold (applied before fusing).
    query = QUERIES[0]
    dense = dense_ranking(encoder, corpus_vectors, query, allowed)
    cut = index.search(query, top_k=30, where=where)[9].score
    kept = [h.id for h in index.search(query, top_k=20, where=where) if h.score >= cut]
    want = rrf_by_hand(kept, bm25_ranking(query, allowed)[:20], top_k=5, k=10)
    got = index.search(query, top_k=5, where=where, mode="hybrid", rrf_k=10, depth=20, threshold=cut)
    assert [h.id for h in got] == [d for d, _ in want] and len(kept) == 10 and dense[:10] == kept


def test_lexical_finds_a_rare_word_the_dense_model_misses(index: SearchIndex) -> None:
    rare = len(TEXTS) - 1
    dense = [h.id for h in index.search("zk7", top_k=len(TEXTS))]
    assert dense.index(rare) > 50, dense.index(rare)  # the dense model ranks it among the last
    (hit,) = index.search("zk7", top_k=10, mode="lexical")
    assert (hit.id, hit.text) == (rare, RARE) and hit.score > 0
    # Fused, it is back on top: 1/(60+1) from BM25, level with the dense list's first (ties: smaller id).
    assert rare in [h.id for h in index.search("zk7", top_k=2, mode="hybrid")]


@pytest.mark.parametrize(
    "query",
    ['AND', 'dog OR', 'NOT', 'NEAR(dog man, 2)', '"unbalanced', 'text:dog', 'dog*', '^dog', '(', ')', '-dog', '+',
     '***', "dog's", 'a AND OR NOT b', '{text}: dog', '"""', 'x" OR "y', 'dog\x00man', "\u00e9t\u00e9 caf\u00e9"],
)
def test_fts5_syntax_in_a_query_is_plain_text(index: SearchIndex, query: str) -> None:
    for mode in ("lexical", "hybrid"):
        hits = index.search(query, top_k=5, mode=mode)
        assert len(hits) <= 5
    words = set(re.findall(r"\w+", query.lower()))
    for hit in index.search(query, top_k=5, mode="lexical"):
        assert words & set(re.findall(r"\w+", hit.text.lower())), (query, hit.text)
    if not words:
        assert index.search(query, top_k=5, mode="lexical") == []


def test_full_text_index_follows_every_write(encoder: Encoder, tmp_path: Path) -> None:
    idx = SearchIndex.create(encoder.dim, "hnsw", encoder=encoder)
    idx.add(["the dog runs", "a cat sleeps"])
    idx.upsert(["u1", "u2"], ["a red house", "a blue car"])
    assert [h.text for h in idx.search("house", mode="lexical")] == ["a red house"]
    idx.upsert(["u1"], ["a green tree"])
    assert idx.search("house", mode="lexical") == [] and idx.search("tree", mode="lexical")[0].doc_id == "u1"
    idx.delete_ids(["u2"])
    idx.delete([0])
    assert idx.search("car dog", mode="lexical") == []
    idx.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    assert [h.text for h in loaded.search_lexical(["cat", "tree"])[0]] == ["a cat sleeps"]
    assert loaded._store.fts_count() == loaded._store.count() == 2
    with pytest.raises(SearchIndexError, match="threshold is a cosine similarity"):
        loaded.search("cat", mode="lexical", threshold=0.5)
    with pytest.raises(SearchIndexError, match="mode must be one of dense, lexical, hybrid"):
        loaded.search("cat", mode="bm25")
    with pytest.raises(SearchIndexError, match="depth must be an integer >= top_k"):
        loaded.search("cat", mode="hybrid", top_k=5, depth=3)


def _downgrade_to_format_1(path: Path) -> None:
    """Rewrite a saved index as diffcse's format 1 wrote it: no doc_id column, no FTS5 table, format_version 1."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    store = path / manifest["generation"] / manifest["files"]["store"]["name"]
    conn = sqlite3.connect(store)
    conn.executescript("""
        DROP TRIGGER items_fts_delete; DROP TRIGGER items_fts_update;
        DROP TABLE items_fts; DROP INDEX items_doc_id; ALTER TABLE items DROP COLUMN doc_id; VACUUM;
    """)
    conn.close()
    manifest["files"]["store"].update(bytes=store.stat().st_size, sha256=sha256_file(store))
    manifest["format_version"] = 1
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_format_1_index_loads_upgrades_and_is_refused_when_inconsistent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    old = SearchIndex.create(8, "hnsw")
    old.add_vectors(rng.normal(size=(30, 8)), [f"old text number {i}" for i in range(30)])
    old.delete([3])
    path = old.save(tmp_path / "idx")
    _downgrade_to_format_1(path)
    generation = read_manifest(path).generation
    # Loads: the full-text index is built in memory; the saved generation is not touched.
    loaded = SearchIndex.load(path)
    assert loaded.stats()["format_version"] == 1
    assert [h.id for h in loaded.search_lexical("number 7")][:1] == [7]
    assert len(loaded) == 29 and read_manifest(path).generation == generation
    loaded.close()
    # `diffcse index upgrade` writes it as format 2 (any save does); then it is current.
    assert main(["index", "upgrade", "--index-dir", str(path)]) == 0
    assert "from format 1 to 2" in capsys.readouterr().out
    m = read_manifest(path)
    assert m.format_version == 2 and m.generation != generation
    again = SearchIndex.load(path)
    assert again._store.is_current() and again.search_lexical("number 7")[0].id == 7 and len(again) == 29
    again.close()
    assert main(["index", "upgrade", "--index-dir", str(path)]) == 0
    assert "already format 2" in capsys.readouterr().out
    # A format-2 manifest over a store without the new tables is damage, not an old index.
    _downgrade_to_format_1(path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(CorruptIndexError, match="lacks the document-id column or the full-text index"):
        SearchIndex.load(path)
