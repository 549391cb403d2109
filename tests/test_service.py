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
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402
from conftest import sentences  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.core.encoder import Encoder  # noqa: E402
from diffcse.search import SearchIndex, lock_holder, read_manifest  # noqa: E402
from diffcse.search.service import (  # noqa: E402
    NON_BLANK,
    ServiceLimits,
    allowed_host_names,
    create_app,
    exposure_warnings,
)

faiss.omp_set_num_threads(1)
TEXTS = sentences(200, seed=11)
LIMITS = ServiceLimits(max_batch=8, max_text_chars=200, max_top_k=50, max_body_bytes=20_000)
KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: str) -> Encoder:
    """Tiny BERT, mean pooling."""
    return Encoder.load(tiny_bert_dir, pooler="avg")


@contextmanager
def uvicorn_thread(app: FastAPI) -> Iterator[httpx.Client]:
    """Serve app with a real uvicorn on 127.0.0.1 in a thread; yields a client of it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A saved HNSW index served by uvicorn in a thread (writes need KEY); yields client, app, index and dir."""
    path = tmp_path_factory.mktemp("svc") / "idx"
    index = SearchIndex.build(encoder, TEXTS, kind="hnsw", metadata=[{"n": i} for i in range(len(TEXTS))])
    index.save(path)
    index = SearchIndex.load(path, encoder=encoder)
    app = create_app(index, limits=LIMITS, persist="add", api_key=KEY)
    with uvicorn_thread(app) as client:
        yield {"client": client, "app": app, "index": index, "path": path, "encoder": encoder}


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
    r = c.post("/add", json={"texts": ["a green car on the road", "two happy dogs"], "metadata": [{"src": "api"}, None]},
               headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["saved"] and body["count"] == before + 2 and len(body["ids"]) == 2
    hit = c.post("/search", json={"queries": ["a green car on the road"], "top_k": 1}).json()["results"][0][0]
    assert (hit["id"], hit["metadata"]) == (body["ids"][0], {"src": "api"})
    assert read_manifest(path).count == before + 2  # on disk before the answer came back
    r = c.post("/delete", json={"ids": [body["ids"][0], 10**9]}, headers=AUTH)
    assert r.json() == {"deleted": 1, "count": before + 1, "saved": True}
    top = c.post("/search", json={"queries": ["a green car on the road"], "top_k": 3}).json()["results"][0]
    assert body["ids"][0] not in [h["id"] for h in top]
    reloaded = SearchIndex.load(path)
    assert len(reloaded) == before + 1 and reloaded.get([body["ids"][1]])[body["ids"][1]][0] == "two happy dogs"


def test_upsert_filters_modes_and_delete_by_doc_id(served: dict) -> None:
    c, path = served["client"], served["path"]
    before = c.get("/health").json()["count"]
    docs = [{"id": "web-1", "text": "a quokka sleeps in the park", "metadata": {"src": "web", "year": 2001}},
            {"id": "web-2", "text": "a red car on the road", "metadata": {"src": "web", "year": 2015}},
            {"id": "book-1", "text": "she reads a book about a quokka", "metadata": {"src": "book", "year": 2001}}]
    r = c.post("/upsert", json={"documents": docs}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["added"], body["replaced"], body["count"], body["saved"]) == (3, 0, before + 3, True)
    assert read_manifest(path).count == before + 3  # on disk before the answer came back
    # Replace one: same doc id, new text and metadata.
    r = c.post("/upsert", json={"documents": [{"id": "web-1", "text": "a quokka eats an apple",
                                               "metadata": {"src": "web", "year": 2003}}]}, headers=AUTH)
    assert (r.json()["added"], r.json()["replaced"], r.json()["count"]) == (0, 1, before + 3)
    # Lexical: the rare word, only in the upserted texts; the filter applies to it too.
    lex = c.post("/search", json={"queries": ["quokka"], "mode": "lexical", "top_k": 5}).json()["results"][0]
    assert {(h["doc_id"], h["text"]) for h in lex} == {("web-1", "a quokka eats an apple"),
                                                      ("book-1", "she reads a book about a quokka")}
    lex = c.post("/search", json={"queries": ["quokka"], "mode": "lexical", "where": {"src": "web"}}).json()
    assert [h["doc_id"] for h in lex["results"][0]] == ["web-1"]
    # Dense with filters: only matching documents, filled up to what exists.
    for where, want in (({"src": {"in": ["web", "book"]}, "year": {"lt": 2010}}, {"web-1", "book-1"}),
                        ({"year": {"gte": 2010}}, {"web-2"}), ({"src": "nowhere"}, set())):
        for mode in ("dense", "hybrid"):
            r = c.post("/search", json={"queries": ["a quokka"], "top_k": 10, "where": where, "mode": mode})
            assert r.status_code == 200, r.text
            assert {h["doc_id"] for h in r.json()["results"][0]} == want, (where, mode)
    # Texts added by /add carry no doc id.
    hit = c.post("/search", json={"queries": [TEXTS[0]], "top_k": 1}).json()["results"][0][0]
    assert hit["doc_id"] is None and hit["id"] == 0
    r = c.post("/delete", json={"doc_ids": ["web-1", "nope"], "ids": [10**9]}, headers=AUTH)
    assert r.json() == {"deleted": 1, "count": before + 2, "saved": True}
    reloaded = SearchIndex.load(path)
    assert set(reloaded.get_docs(["web-1", "web-2", "book-1"])) == {"web-2", "book-1"}
    assert c.post("/delete", json={"doc_ids": ["web-2", "book-1"]}, headers=AUTH).json()["count"] == before


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
        ("/add", {"texts": ["a", "b"], "metadata": [{}]}, 422, "metadata has 1 entries for 2 texts"),
        ("/add", {"texts": ["a"], "metadata": ["not an object"]}, 422, "metadata"),
        ("/delete", {"ids": ["x"]}, 422, "ids"),
        ("/delete", {}, 422, "give ids and/or doc_ids"),
        ("/delete", {"ids": []}, 422, "at least 1"),
        ("/delete", {"doc_ids": [" "]}, 422, "doc id is empty"),
        ("/upsert", {"documents": [{"text": "no id"}]}, 422, "id"),
        ("/upsert", {"documents": [{"id": "a", "text": "t", "extra": 1}]}, 422, "extra"),
        ("/search", {"queries": ["a"], "where": {"year": {"between": [1, 2]}}}, 422, "unknown operator 'between'"),
        ("/search", {"queries": ["a"], "where": {"a b": 1}}, 422, "not a field name"),
        ("/search", {"queries": ["a"], "where": {"year": {"gt": True}}}, 422, "needs a number or a string"),
        ("/search", {"queries": ["a"], "where": {"year": {"in": []}}}, 422, "'in' needs a list"),
        ("/search", {"queries": ["a"], "where": {"year": None}}, 422, "string, number or boolean"),
        ("/search", {"queries": ["a"], "where": ["year"]}, 422, "where"),
        ("/search", {"queries": ["a"], "mode": "bm25"}, 422, "mode"),
        ("/search", {"queries": ["a"], "mode": "lexical", "threshold": 0.5}, 422, "threshold is a cosine similarity"),
    ],
)
def test_invalid_bodies(served: dict, endpoint: str, body: dict, status: int, needle: str) -> None:
    count = served["client"].get("/health").json()["count"]
    r = served["client"].post(endpoint, json=body, headers=AUTH)
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


@pytest.mark.parametrize(
    ("endpoint", "raw", "field"),
    [
        # Python's JSON parser takes NaN/Infinity; the 422 used to echo them and then fail to render.
        ("/search", b'{"queries": ["a"], "threshold": NaN}', "threshold"),
        ("/search", b'{"queries": ["a"], "threshold": Infinity}', "threshold"),
        ("/search", b'{"queries": ["a"], "threshold": -Infinity}', "threshold"),
        # A lone surrogate is valid JSON text but no valid UTF-8 string.
        ("/encode", b'{"texts": ["\\ud800"]}', "texts"),
        ("/search", b'{"queries": ["ok", "x\\udfff"]}', "queries"),
        ("/similarity", b'{"a": ["\\ud800"], "b": ["a"]}', "a"),
        ("/add", b'{"texts": ["\\ud800"]}', "texts"),
        ("/add", b'{"texts": ["a"], "metadata": [{"k": "\\ud800"}]}', "metadata"),
        ("/add", b'{"texts": ["a"], "metadata": [{"\\ud800": 1}]}', "metadata"),
        ("/add", b'{"texts": ["a"], "metadata": [{"score": NaN}]}', "metadata"),
        ("/add", b'{"texts": ["a"], "metadata": [{"deep": [1, {"x": Infinity}]}]}', "metadata"),
        ("/search", b'{"queries": ["a"], "\\ud800": 1}', "body"),
        # Past SQLite's signed 64-bit INTEGER.
        ("/delete", b'{"ids": [9223372036854775808]}', "ids"),
        ("/delete", b'{"ids": [1, 99999999999999999999999]}', "ids"),
    ],
)
def test_former_server_errors_are_422(served: dict, endpoint: str, raw: bytes, field: str) -> None:
    c = served["client"]
    count = c.get("/health").json()["count"]
    r = c.post(endpoint, content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]  # strict JSON: the echoed input was made printable
    assert any(field in e["loc"] for e in detail), detail
    json.dumps(detail, allow_nan=False)
    assert c.get("/health").json()["count"] == count


def test_writes_need_the_api_key(served: dict, encoder: Encoder) -> None:
    c = served["client"]
    count = c.get("/health").json()["count"]
    body = {"texts": ["a key-guarded sentence"]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        r = c.post("/add", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/delete", json={"ids": [0]}, headers=headers).status_code == 401
        assert c.post("/delete", json={"doc_ids": ["a"]}, headers=headers).status_code == 401
        assert c.post("/upsert", json={"documents": [{"id": "k", "text": "guarded"}]}, headers=headers).status_code == 401
    assert c.get("/health").json()["count"] == count
    r = c.post("/add", json=body, headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert c.post("/delete", json={"ids": r.json()["ids"]}, headers=AUTH).json()["deleted"] == 1
    # Reads need no key.
    assert c.post("/search", json={"queries": ["a dog"], "top_k": 1}).status_code == 200
    # No key configured: read-only, and the 403 says how to allow writes.
    index = SearchIndex.create(encoder.dim, "flat", encoder=encoder)
    index.add(["a read-only index"])
    with uvicorn_thread(create_app(index, persist="never")) as ro:
        for endpoint, payload in (("/add", body), ("/delete", {"ids": [0]}),
                                  ("/upsert", {"documents": [{"id": "k", "text": "guarded"}]})):
            for headers in ({}, AUTH):
                r = ro.post(endpoint, json=payload, headers=headers)
                assert r.status_code == 403 and "--api-key" in r.json()["detail"], r.text
        assert ro.post("/search", json={"queries": ["a read-only index"]}).json()["results"][0][0]["id"] == 0
        assert ro.get("/stats").json()["writes"].startswith("disabled")
    assert len(index) == 1


def test_host_header_must_name_this_server(served: dict, encoder: Encoder) -> None:
    c = served["client"]
    port = c.base_url.port
    for host in ("evil.example", "evil.example:80", f"attacker.test:{port}", "127.0.0.2"):
        r = c.get("/health", headers={"Host": host})
        assert r.status_code == 400, (host, r.text)
        assert c.post("/search", json={"queries": ["a"]}, headers={"Host": host}).status_code == 400
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert c.get("/health", headers={"Host": host}).status_code == 200, host
    index = SearchIndex.create(encoder.dim, "flat", encoder=encoder)
    app = create_app(index, persist="never", host="0.0.0.0", allowed_hosts=["search.example.org"])
    with uvicorn_thread(app) as other:
        assert other.get("/health", headers={"Host": "search.example.org"}).status_code == 200
        assert other.get("/health", headers={"Host": "0.0.0.0"}).status_code == 200
        assert other.get("/health", headers={"Host": "other.example.org"}).status_code == 400


def test_chunked_oversize_body_is_cut_off(served: dict) -> None:
    # No Content-Length: the limit can only be enforced while the body streams in.
    c, app = served["client"], served["app"]
    limit, total, chunk = LIMITS.max_body_bytes, 20_000_000, b" " * 65536
    produced = 0

    def body() -> Iterator[bytes]:
        nonlocal produced
        while produced < total:
            produced += len(chunk)
            yield chunk

    app.state.max_body_pulled = 0
    r = c.post("/search", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert f"the limit is {limit} bytes" in r.json()["detail"]
    pulled = app.state.max_body_pulled
    # Stopped after the chunk that crossed the limit (uvicorn hands over up to ~128 KiB at once).
    assert limit < pulled <= limit + 256 * 1024, pulled
    # The connection was closed, so the client could not push the whole 20 MB.
    assert produced < total, produced
    assert c.get("/health").status_code == 200


def test_stats_show_no_absolute_paths(served: dict, tiny_bert_dir: str) -> None:
    stats = served["client"].get("/stats").json()
    strings: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            strings.extend(map(str, value))
            list(map(walk, value.values()))
        elif isinstance(value, list):
            list(map(walk, value))
        elif isinstance(value, str):
            strings.append(value)

    walk(stats)
    assert not [s for s in strings if s.startswith("/") and s not in stats["requests"]], strings
    assert stats["path"] == "idx" and stats["model"]["name_or_path"] == Path(tiny_bert_dir).name
    assert stats["writes"].startswith("enabled")


def test_openapi_states_what_is_enforced(served: dict) -> None:
    spec = served["client"].get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    text = schemas["SearchRequest"]["properties"]["queries"]["items"]
    assert text == {"type": "string", "maxLength": 200, "pattern": NON_BLANK}
    assert schemas["SearchRequest"]["properties"]["queries"]["maxItems"] == 8
    ids = schemas["DeleteRequest"]["properties"]["ids"]["items"]
    assert ids["minimum"] == 0 and 2**50 < ids["maximum"] < 2**63
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    search = schemas["SearchRequest"]
    assert search["properties"]["mode"]["enum"] == ["dense", "lexical", "hybrid"]
    where = search["properties"]["where"]["anyOf"][0]
    assert where["propertyNames"]["pattern"].startswith("^") and where["maxProperties"] == 32
    ops = where["additionalProperties"]["anyOf"][-1]
    assert set(ops["properties"]) == {"eq", "ne", "in", "gt", "gte", "lt", "lte"} and ops["additionalProperties"] is False
    assert search["not"]["properties"]["mode"] == {"const": "lexical"}  # no threshold with BM25 alone
    assert schemas["DeleteRequest"]["anyOf"] == [{"required": ["ids"]}, {"required": ["doc_ids"]}]
    assert schemas["Document"]["required"] == ["id", "text"] and "doc_id" in schemas["Hit"]["properties"]
    for path in ("/search", "/encode", "/similarity", "/add", "/upsert", "/delete"):
        responses = set(spec["paths"][path]["post"]["responses"])
        assert {"200", "400", "413", "422"} <= responses, (path, responses)
        if path in ("/add", "/upsert", "/delete"):
            assert {"401", "403", "503"} <= responses
            assert spec["paths"][path]["post"]["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]


def test_exposure_warnings_and_host_names() -> None:
    assert exposure_warnings("127.0.0.1", None) == exposure_warnings("::1", "k") == []
    assert exposure_warnings("localhost", None) == exposure_warnings("127.9.9.9", None) == []
    (ro,) = exposure_warnings("0.0.0.0", None)
    assert "read-only" in ro and "--api-key" in ro
    (plain,) = exposure_warnings("192.168.1.5", "k")
    assert "plain HTTP" in plain
    assert allowed_host_names("::", ["a.example"]) == ["localhost", "127.0.0.1", "::1", "[::1]", "::", "a.example", "[::]"]
    with pytest.raises(ValueError, match="--allowed-host 'a.\\*.example'"):
        allowed_host_names("127.0.0.1", ["a.*.example"])


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
        r = c.post("/add", json={"texts": [f"concurrent sentence number {i} about a red car"]}, headers=AUTH)
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
def test_cli_serve_subprocess_saves_on_shutdown(encoder: Encoder, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `diffcse serve` as users run it: its own process, SIGINT to stop, --persist shutdown, the key
    # from the environment.
    path = SearchIndex.build(encoder, TEXTS[:40], kind="flat").save(tmp_path / "idx")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffcse", "serve", "--index-dir", str(path), "--port", str(port),
         "--persist", "shutdown", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "DIFFCSE_API_KEY": KEY},
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
            assert client.post("/add", json={"texts": ["no key"]}).status_code == 401
            r = client.post("/add", json={"texts": ["one more sentence"]}, headers={"X-API-Key": KEY})
            assert r.status_code == 200 and r.json()["saved"] is False
            assert read_manifest(path).count == 40
            # The server holds the writer lock for its whole life: a CLI writer fails, naming it,
            # instead of having its rows overwritten at shutdown.
            assert lock_holder(path)["pid"] == proc.pid
            capsys.readouterr()
            assert main(["index", "delete", "--index-dir", str(path), "--ids", "0", "--lock-timeout", "0.3"]) == 2
            err = capsys.readouterr().err.strip()
            assert f"pid {proc.pid}" in err and "--persist shutdown" in err and len(err.splitlines()) == 1, err
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_manifest(path).count == 41
    assert lock_holder(path) is None
