"""The HTTP service, started for real with uvicorn on 127.0.0.1 and driven with httpx."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402
from conftest import sentences  # noqa: E402

from diffcse.core.encoder import Encoder  # noqa: E402
from diffcse.search import SearchIndex, read_manifest  # noqa: E402
from diffcse.search.service import ServiceLimits, create_app  # noqa: E402

faiss.omp_set_num_threads(1)
TEXTS = sentences(200, seed=11)
LIMITS = ServiceLimits(max_batch=8, max_text_chars=200, max_top_k=50, max_body_bytes=20_000)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: str) -> Encoder:
    """Tiny BERT, mean pooling."""
    return Encoder.load(tiny_bert_dir, pooler="avg")


@pytest.fixture(scope="module")
def served(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A saved HNSW index served by uvicorn in a thread; yields the base URL, index and dir."""
    path = tmp_path_factory.mktemp("svc") / "idx"
    index = SearchIndex.build(encoder, TEXTS, kind="hnsw", metadata=[{"n": i} for i in range(len(TEXTS))])
    index.save(path)
    index = SearchIndex.load(path, encoder=encoder)
    app = create_app(index, limits=LIMITS, persist="add")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield {"client": client, "index": index, "path": path, "encoder": encoder}
    server.should_exit = True
    thread.join(timeout=10)


def test_health_stats_and_docs(served: dict) -> None:
    c = served["client"]
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["kind"] == "hnsw" and health["dim"] == 32
    assert health["count"] == len(served["index"])
    stats = c.get("/stats").json()
    assert stats["limits"]["max_batch"] == 8 and stats["model"]["pooler"] == "avg"
    assert stats["requests"]["/health"] >= 1
    spec = c.get("/openapi.json").json()
    assert {"/encode", "/search", "/similarity", "/add", "/health", "/stats"} <= set(spec["paths"])
    assert c.get("/docs").status_code == 200


def test_search_matches_library(served: dict) -> None:
    c, index = served["client"], served["index"]
    queries = ["a man plays guitar", TEXTS[3]]
    r = c.post("/search", json={"queries": queries, "top_k": 4})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = index.search(queries, top_k=4)
    assert [[h["id"] for h in row] for row in got] == [[h.id for h in row] for row in want]
    assert got[1][0]["text"] == TEXTS[3] and got[1][0]["metadata"] == {"n": 3}
    np.testing.assert_allclose([h["score"] for h in got[0]], [h.score for h in want[0]], atol=1e-5)
    cut = (want[0][1].score + want[0][2].score) / 2
    r = c.post("/search", json={"queries": queries[:1], "top_k": 4, "threshold": cut, "ef_search": 64})
    assert [h["id"] for h in r.json()["results"][0]] == [h.id for h in want[0][:2]]


def test_encode_and_similarity(served: dict) -> None:
    c, enc = served["client"], served["encoder"]
    r = c.post("/encode", json={"texts": ["a dog", "a cat runs"]})
    body = r.json()
    assert r.status_code == 200 and body["dim"] == 32
    vecs = np.array(body["embeddings"])
    np.testing.assert_allclose(vecs, enc.encode(["a dog", "a cat runs"], normalize=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    raw = np.array(c.post("/encode", json={"texts": ["a dog"], "normalize": False}).json()["embeddings"])
    assert abs(np.linalg.norm(raw) - 1.0) > 1e-3
    r = c.post("/similarity", json={"a": ["a dog", "the man"], "b": ["a dog", "a cat", "two red cars"]})
    scores = np.array(r.json()["scores"])
    assert scores.shape == (2, 3) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(scores, enc.similarity(["a dog", "the man"], ["a dog", "a cat", "two red cars"]), atol=1e-5)


def test_add_delete_persist(served: dict) -> None:
    c, path = served["client"], served["path"]
    before = c.get("/health").json()["count"]
    r = c.post("/add", json={"texts": ["a green car on the road", "two happy dogs"], "metadata": [{"src": "api"}, None]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["saved"] and body["count"] == before + 2 and len(body["ids"]) == 2
    hit = c.post("/search", json={"queries": ["a green car on the road"], "top_k": 1}).json()["results"][0][0]
    assert (hit["id"], hit["metadata"]) == (body["ids"][0], {"src": "api"})
    assert read_manifest(path).count == before + 2  # on disk before the answer came back
    r = c.post("/delete", json={"ids": [body["ids"][0], 10**9]})
    assert r.json() == {"deleted": 1, "count": before + 1, "saved": True}
    top = c.post("/search", json={"queries": ["a green car on the road"], "top_k": 3}).json()["results"][0]
    assert body["ids"][0] not in [h["id"] for h in top]
    reloaded = SearchIndex.load(path)
    assert len(reloaded) == before + 1 and reloaded.get([body["ids"][1]])[body["ids"][1]][0] == "two happy dogs"


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "needle"),
    [
        ("/search", {}, 422, "queries"),
        ("/search", {"queries": []}, 422, "at least 1"),
        ("/search", {"queries": ["  "]}, 422, "empty or whitespace"),
        ("/search", {"queries": "a man"}, 422, "list"),
        ("/search", {"queries": ["x" * 201]}, 422, "at most 200 characters"),
        ("/search", {"queries": ["a"] * 9}, 422, "at most 8 items"),
        ("/search", {"queries": ["a"], "top_k": 0}, 422, "top_k"),
        ("/search", {"queries": ["a"], "top_k": 51}, 422, "less than or equal to 50"),
        ("/search", {"queries": ["a"], "top_k": "5"}, 422, "top_k"),
        ("/search", {"queries": ["a"], "threshold": 1.5}, 422, "threshold"),
        ("/search", {"queries": ["a"], "topk": 5}, 422, "topk"),
        ("/search", {"queries": [3]}, 422, "string"),
        ("/encode", {"texts": [None]}, 422, "string"),
        ("/similarity", {"a": ["x"]}, 422, '"body", "b"'),
        ("/add", {"texts": ["a", "b"], "metadata": [{}]}, 400, "metadata has 1 entries for 2 texts"),
        ("/add", {"texts": ["a"], "metadata": ["not an object"]}, 422, "metadata"),
        ("/delete", {"ids": ["x"]}, 422, "ids"),
    ],
)
def test_invalid_bodies(served: dict, endpoint: str, body: dict, status: int, needle: str) -> None:
    count = served["client"].get("/health").json()["count"]
    r = served["client"].post(endpoint, json=body)
    assert r.status_code == status, r.text
    assert needle in json.dumps(r.json()["detail"])
    assert served["client"].get("/health").json()["count"] == count


def test_malformed_and_oversized_requests(served: dict) -> None:
    c = served["client"]
    r = c.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()
    r = c.post("/search", json={"queries": ["a " * 90] * 8, "pad": "x" * 30_000})
    assert r.status_code == 413 and "limit is 20000" in r.json()["detail"]
    assert c.get("/nope").status_code == 404
    assert c.get("/search").status_code == 405


def test_concurrent_requests(served: dict) -> None:
    c = served["client"]
    queries = [[TEXTS[i]] for i in range(12)]
    expected = [c.post("/search", json={"queries": q, "top_k": 3}).json() for q in queries]
    start = c.get("/health").json()["count"]

    def search(i: int) -> dict:
        r = c.post("/search", json={"queries": queries[i % 12], "top_k": 3})
        assert r.status_code == 200, r.text
        return r.json()

    def add(i: int) -> list[int]:
        r = c.post("/add", json={"texts": [f"concurrent sentence number {i} about a red car"]})
        assert r.status_code == 200, r.text
        return r.json()["ids"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        searches = [pool.submit(search, i) for i in range(48)]
        adds = [pool.submit(add, i) for i in range(6)]
        search_out = [f.result() for f in searches]
        add_ids = [i for f in adds for i in f.result()]
    # Added texts were far from these queries (each query is an indexed sentence, found first).
    for i, out in enumerate(search_out):
        assert out["results"][0][0] == expected[i % 12]["results"][0][0]
    assert len(set(add_ids)) == 6
    assert c.get("/health").json()["count"] == start + 6
    assert read_manifest(served["path"]).count == start + 6


@pytest.mark.slow
def test_cli_serve_subprocess_saves_on_shutdown(encoder: Encoder, tmp_path: Path) -> None:
    # `diffcse serve` as users run it: its own process, SIGINT to stop, --persist shutdown.
    path = SearchIndex.build(encoder, TEXTS[:40], kind="flat").save(tmp_path / "idx")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffcse", "serve", "--index-dir", str(path), "--port", str(port),
         "--persist", "shutdown", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while True:
                assert proc.poll() is None, proc.stdout.read()
                assert time.time() < deadline, "diffcse serve did not come up"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = client.post("/add", json={"texts": ["one more sentence"]})
            assert r.status_code == 200 and r.json()["saved"] is False
            assert read_manifest(path).count == 40
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_manifest(path).count == 41
