"""Documents under the user's ids: upsert / delete_ids, faiss and store in step, HNSW compaction, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.search import CorruptIndexError, SearchIndex, SearchIndexError, read_manifest  # noqa: E402

faiss.omp_set_num_threads(1)
DIM = 16
PARAMS = {"flat": {}, "ivf": {"nlist": 8}, "hnsw": {}, "ivfpq": {"nlist": 4, "m": 4, "nbits": 6},
          "ivfsq8": {"nlist": 4}, "ivfpq+rescore": {"nlist": 4, "m": 4, "nbits": 6, "rescore": 8},
          "ivfsq8+rescore": {"nlist": 2, "rescore": 4}}


def create(kind: str) -> SearchIndex:
    """An empty index of a test kind ("ivfpq+rescore": IVF-PQ re-scored with its exact vectors)."""
    return SearchIndex.create(DIM, kind.split("+")[0], PARAMS[kind])


def vecs(n: int, seed: int) -> np.ndarray:
    """n random vectors."""
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def faiss_ids(idx: SearchIndex) -> set[int]:
    """Every id faiss holds (IDMap's table, or the IVF lists)."""
    index = idx._index
    if isinstance(index, faiss.IndexIDMap):
        return set(faiss.vector_to_array(index.id_map).tolist())
    invlists = faiss.extract_index_ivf(index).invlists
    out: set[int] = set()
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size:
            out.update(faiss.rev_swig_ptr(invlists.get_ids(lst), size).tolist())
    return out


def check_in_step(idx: SearchIndex) -> None:
    """faiss, the store, its tombstones, its full-text index and the manifest all agree."""
    store = idx._store
    live = set(store.rows(range(idx.manifest.next_id)))
    dead = set(store.tombstones())
    assert store.count() == len(live) == len(idx) == idx.manifest.count
    assert store.fts_count() == len(live)
    assert idx._index.ntotal == idx.manifest.ntotal == len(live) + len(dead)
    assert faiss_ids(idx) == live | dead and not live & dead
    if idx.kind != "hnsw":
        assert not dead
    if idx._vectors is not None:
        # One exact vector per id ever issued, and the live ones are the vectors faiss holds.
        assert idx._vectors.rows == idx.manifest.next_id
        rows = idx._vectors.read(np.arange(idx.manifest.next_id))
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq", "ivfsq8", "ivfpq+rescore"])
def test_upsert_and_delete_ids_round_trip(kind: str, tmp_path: Path) -> None:
    idx = create(kind)
    base = vecs(300, 1)
    idx.add_vectors(base, [f"plain {i}" for i in range(300)])  # integer-id documents live alongside
    check_in_step(idx)
    old = vecs(3, 2)
    res = idx.upsert_vectors(["a", "b", "c"], old, ["alpha zebra", "beta", "gamma"], [{"v": 1}, None, {"v": 1}])
    assert (res.added, res.replaced, res.ids) == (3, 0, [300, 301, 302])
    check_in_step(idx)
    new = vecs(2, 3)
    res = idx.upsert_vectors(["a", "d"], new, ["alpha yak", "delta"], [{"v": 2}, None])
    assert (res.added, res.replaced, res.ids) == (1, 1, [303, 304])
    check_in_step(idx)
    assert len(idx) == 304
    exact = {"ef_search": 400} if kind == "hnsw" else {} if kind == "flat" else {"nprobe": 8}
    hit = idx.search_vectors(new[0], top_k=1, **exact)[0][0]
    assert (hit.doc_id, hit.text, hit.metadata) == ("a", "alpha yak", {"v": 2})
    # The old version is gone from both the vectors and the words.
    assert all(h.doc_id != "a" or h.text == "alpha yak" for h in idx.search_vectors(old[0], top_k=20, **exact)[0])
    assert idx.search_lexical("zebra") == []
    assert [h.doc_id for h in idx.search_lexical("yak")] == ["a"]
    docs = idx.get_docs(["a", "b", "zzz"])
    assert set(docs) == {"a", "b"} and docs["a"].text == "alpha yak" and docs["b"].id == 301
    # Repeated ids: the last one wins, counted once.
    res = idx.upsert_vectors(["e", "e"], vecs(2, 4), ["first e", "second e"])
    assert (res.added, res.replaced, res.ids) == (1, 0, [305, 305])
    assert idx.get_docs(["e"])["e"].text == "second e"
    check_in_step(idx)
    assert idx.delete_ids(["b", "b", "nope"]) == 1 and idx.delete_ids(["b"]) == 0
    assert idx.delete([0, 1, 10**9]) == 2  # integer ids still work
    check_in_step(idx)
    assert len(idx) == 302
    # Saved and reloaded: ids stable, internal ids continue, nothing out of step.
    idx.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    check_in_step(loaded)
    assert loaded.get_docs(["a", "c", "d", "e"]).keys() == {"a", "c", "d", "e"}
    assert loaded.search_vectors(new[0], top_k=1, **exact)[0][0].doc_id == "a"
    res = loaded.upsert_vectors(["c"], vecs(1, 5), ["gamma two"])
    assert (res.added, res.replaced, res.ids) == (0, 1, [306])
    check_in_step(loaded)
    loaded.save()
    again = SearchIndex.load(tmp_path / "idx")
    check_in_step(again)
    assert again.get_docs(["c"])["c"].text == "gamma two" and len(again) == 302
    assert again.stats()["doc_ids"] == 4


def test_doc_id_errors() -> None:
    idx = SearchIndex.create(DIM, "flat")
    for ids, message in ((["a", ""], "doc id #1 is empty"), (["a", 3], "doc id #1 is int, not str"),
                         ("ab", "not one string"), (["x" * 300, "b"], "doc id #0 has 300 characters; at most 256"),
                         (["a"], "got 1 doc ids for 2 texts")):
        with pytest.raises(SearchIndexError, match=message):
            idx.upsert_vectors(ids, vecs(2, 0), ["t1", "t2"])
    with pytest.raises(SearchIndexError, match="doc id #0 is not valid Unicode"):
        idx.delete_ids(["\ud800"])
    assert len(idx) == 0 and idx._index.ntotal == 0


@pytest.mark.parametrize("step", ["add_with_ids", "remove_ids"])
def test_a_failing_faiss_step_leaves_everything_as_it_was(step: str, tmp_path: Path) -> None:
    idx = SearchIndex.create(DIM, "flat")
    idx.upsert_vectors(["a", "b"], vecs(2, 11), ["first one", "second two"])
    path = idx.save(tmp_path / "idx")

    real = getattr(idx._index, step)
    failed: list[bool] = []

    def fail_once(*args: object) -> object:
        if not failed:
            failed.append(True)
            raise RuntimeError("faiss ran out of memory")
        return real(*args)

    # The store has changed (uncommitted) when faiss fails; after a failed removal, the vectors
    # just added are taken out again.
    setattr(idx._index, step, fail_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        idx.upsert_vectors(["a", "c"], vecs(2, 12), ["first new", "third three"])
    check_in_step(idx)
    assert {d: r.text for d, r in idx.get_docs(["a", "b", "c"]).items()} == {"a": "first one", "b": "second two"}
    assert idx.search_lexical("new three") == [] and len(idx) == 2
    # Had the undo failed too, faiss would hold vectors the store does not: save() refuses.
    idx._index.add_with_ids(vecs(1, 13), np.array([99]))
    with pytest.raises(CorruptIndexError, match="not saved: faiss holds 3 vectors and the store 2 rows"):
        idx.save()
    check_in_step(SearchIndex.load(path))


def test_hnsw_compaction_past_the_threshold(tmp_path: Path) -> None:
    x = vecs(600, 6)
    idx = SearchIndex.create(DIM, "hnsw", {"compact_threshold": 0.2})
    idx.upsert_vectors([f"d{i}" for i in range(600)], x, [f"text {i}" for i in range(600)])
    path = tmp_path / "idx"
    idx.save(path)
    # 100 of 600 deleted (17%): below the threshold, the tombstones stay through a save.
    assert idx.delete_ids([f"d{i}" for i in range(0, 200, 2)]) == 100
    idx.save()
    assert idx.stats()["deleted_tombstones"] == 100 and idx._index.ntotal == 600
    check_in_step(idx)
    # Replacing 60 more (upsert = delete + add): 160 of 660 (24%) passes it; the save rebuilds.
    y = vecs(60, 7)
    assert idx.upsert_vectors([f"d{i}" for i in range(300, 360)], y, [f"new {i}" for i in range(60)]).replaced == 60
    assert idx.stats()["deleted_tombstones"] == 160
    idx.save()
    assert idx.stats()["deleted_tombstones"] == 0 and idx._index.ntotal == len(idx) == 500
    check_in_step(idx)
    loaded = SearchIndex.load(path)
    check_in_step(loaded)
    assert read_manifest(path).ntotal == 500
    # Results are right after the rebuild: exact at a wide beam, ids and texts of the live rows.
    live_rows = [i for i in range(600) if not (i < 200 and i % 2 == 0) and not 300 <= i < 360]
    live = np.concatenate([x[live_rows], y])
    by_doc = idx.get_docs([f"d{i}" for i in live_rows])
    live_ids = [by_doc[f"d{i}"].id for i in live_rows] + list(range(600, 660))
    ln = live / np.linalg.norm(live, axis=1, keepdims=True)
    q = vecs(8, 8)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = np.asarray(live_ids)[np.argsort(-(qn @ ln.T), axis=1)[:, :10]]
    got = loaded.search_vectors(q, top_k=10, ef_search=600)
    np.testing.assert_array_equal([[h.id for h in row] for row in got], want)
    assert loaded.get_docs(["d300"])["d300"].text == "new 0"
    # compact() on demand; nothing to do on other kinds.
    loaded.delete_ids(["d1", "d3"])
    assert loaded.compact() == 2 and loaded.compact() == 0
    check_in_step(loaded)
    assert SearchIndex.create(DIM, "flat").compact() == 0
    with pytest.raises(SearchIndexError, match="'compact_threshold' must be a number in \\[0, 1\\]"):
        SearchIndex.create(DIM, "hnsw", {"compact_threshold": 1.5})


KILLED = """
import os, signal, sys
import faiss, numpy as np
faiss.omp_set_num_threads(1)
import diffcse.search.index as index_module
from diffcse.search import SearchIndex

path, stage = sys.argv[1], sys.argv[2]
idx = SearchIndex.load(path)
rng = np.random.default_rng(1)
idx.upsert_vectors(["k0", "k1", "new"], rng.normal(size=(3, 16)), ["replaced zero", "replaced one", "brand new"])
idx.delete_ids(["k2"])
if stage == "before-save":
    print("upserted", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
if stage == "mid-save":
    # In the middle of the save: the new generation's faiss file and store are written, not yet named.
    index_module.sha256_file = lambda p: os.kill(os.getpid(), signal.SIGKILL)
else:
    # Every file written (exact vectors appended to the file shared with the live generation), the
    # manifest not yet: the live generation's vector file now holds rows no manifest names.
    index_module.write_json_atomic = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
idx.save()
"""


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfsq8+rescore"])
def test_kill_between_upsert_and_save_leaves_a_consistent_index(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "idx"
    idx = create(kind)
    idx.upsert_vectors([f"k{i}" for i in range(20)], vecs(20, 9), [f"text {i}" for i in range(20)])
    idx.delete_ids(["k19"])
    idx.save(path)
    before = {d: r.text for d, r in idx.get_docs([f"k{i}" for i in range(20)]).items()}
    for stage in ("before-save", "mid-save", "before-manifest"):
        proc = subprocess.run([sys.executable, "-c", KILLED, str(path), stage], capture_output=True, text=True,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if stage == "mid-save":
            assert any(p.name.startswith(".staging") for p in path.iterdir())
        if stage == "before-manifest":
            assert len([p for p in path.iterdir() if p.name.startswith("gen-")]) == 2
        survivor = SearchIndex.load(path)
        check_in_step(survivor)
        assert {d: r.text for d, r in survivor.get_docs(list(before) + ["new"]).items()} == before
        survivor.close()
    # The next writer carries on from the saved state and sweeps the dead process's files.
    survivor = SearchIndex.load(path)
    survivor.upsert_vectors(["k0"], vecs(1, 10), ["after the crash"])
    survivor.save()
    assert not any(p.name.startswith(".staging") for p in path.iterdir())
    check_in_step(SearchIndex.load(path))


def test_cli_upsert_and_delete_doc_ids(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "base.txt"
    corpus.write_text("a man plays guitar\nthe dog runs\n")
    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(corpus),
                 "--index-dir", idx, "--threads", "1"]) == 0
    docs = tmp_path / "docs.jsonl"
    lines = [{"id": "p1", "text": "a red car", "metadata": {"n": 1}}, {"id": 7, "text": "two cats"},
             {"id": "p1", "text": "a blue car", "metadata": {"n": 2}}]
    docs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    assert main(["index", "upsert", "--index-dir", idx, "--input", str(docs), "--threads", "1"]) == 0
    assert "upserted 3 documents (2 new, 0 replaced)" in capsys.readouterr().out
    loaded = SearchIndex.load(idx)
    assert {d: (r.text, r.metadata) for d, r in loaded.get_docs(["p1", "7"]).items()} == {
        "p1": ("a blue car", {"n": 2}), "7": ("two cats", None)}
    check_in_step(loaded)
    assert main(["index", "delete", "--index-dir", idx, "--doc-ids", "p1", "zz", "--ids", "0"]) == 0
    assert "deleted 1 of 1 ids and 1 of 2 doc ids; 2 left" in capsys.readouterr().out
    assert main(["search", "--index-dir", idx, "--query", "cats", "--mode", "lexical", "--json"]) == 0
    (hit,) = json.loads(capsys.readouterr().out)[0]["results"]
    assert (hit["doc_id"], hit["text"]) == ("7", "two cats")
    assert main(["index", "delete", "--index-dir", idx]) == 2
    assert "give --ids and/or --doc-ids" in capsys.readouterr().err
    docs.write_text('{"id": "", "text": "x"}\n')
    assert main(["index", "upsert", "--index-dir", idx, "--input", str(docs)]) == 2
    assert "docs.jsonl:1: field 'id' must be a non-empty string" in capsys.readouterr().err
