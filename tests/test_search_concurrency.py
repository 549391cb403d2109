"""One writer per index across processes: real `diffcse index add` / `diffcse serve` subprocesses on one index.

Also: a waiting writer's timeout names the holder, stale in-memory copies catch up or refuse,
orphan temp files are swept, and a crafted manifest cannot point outside the index folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import sentences  # noqa: E402

from diffcse.cli import main  # noqa: E402
from diffcse.search import (  # noqa: E402
    IndexConflictError,
    IndexFormatError,
    IndexLockedError,
    SearchIndex,
    index_lock,
    lock_holder,
    read_manifest,
)
from diffcse.search.manifest import MANIFEST_NAME  # noqa: E402

faiss.omp_set_num_threads(1)
BASE = [f"base {i} {s}" for i, s in enumerate(sentences(100, seed=21))]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
DIM = 8


def lines(tag: str, n: int = 300) -> list[str]:
    """n distinct texts, each naming its file and line."""
    return [f"{tag} {i} {s}" for i, s in enumerate(sentences(n, seed=len(tag)))]


@pytest.fixture
def built(tiny_bert_dir: str, tmp_path: Path) -> Path:
    """An index of BASE built with `diffcse index build --model <tiny bert>`."""
    corpus = tmp_path / "base.txt"
    corpus.write_text("\n".join(BASE) + "\n")
    idx = tmp_path / "idx"
    assert main(["index", "build", "--model", tiny_bert_dir, "--pooler", "avg", "--input", str(corpus),
                 "--index-dir", str(idx), "--threads", "1"]) == 0
    return idx


def cli(*args: str) -> subprocess.Popen:
    """`python -m diffcse ...` in its own process."""
    return subprocess.Popen([sys.executable, "-m", "diffcse", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def issued_ids(stdout: str) -> list[int]:
    """The ids an `index add` reported ('added N texts (ids A..B) ...')."""
    first, last = map(int, re.search(r"ids (\d+)\.\.(\d+)", stdout).groups())
    return list(range(first, last + 1))


def check_on_disk(idx: Path, expected: dict[int, str]) -> None:
    """The saved index holds exactly `expected` (id -> text), and faiss holds the same ids."""
    index = SearchIndex.load(idx)
    try:
        assert len(index) == len(expected)
        rows = index.get(range(index.manifest.next_id))
        assert {i: text for i, (text, _) in rows.items()} == expected
        m = read_manifest(idx)
        stored = faiss.read_index(str(idx / m.generation / m.files["index"]["name"]))
        assert stored.ntotal == m.count == len(expected)
        assert sorted(faiss.vector_to_array(stored.id_map).tolist()) == sorted(expected)
    finally:
        index.close()


def cpu_ticks(pid: int) -> int:
    """CPU time a process has used so far, in clock ticks (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_until_blocked(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Return once every process is alive and has stopped using CPU (waiting on a lock) for 1.5 s."""
    deadline = time.monotonic() + timeout
    last: list[int] = []
    since = time.monotonic()
    while True:
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the writers never blocked"
        now = [cpu_ticks(p.pid) for p in procs]
        # A writer polling the lock uses microseconds a second; allow a stray tick.
        if last and all(b - a <= 1 for a, b in zip(last, now, strict=True)):
            if time.monotonic() - since >= 1.5:
                return
        else:
            last, since = now, time.monotonic()
        time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see the writers block")
def test_two_cli_adds_at_once_keep_both_files(built: Path, tmp_path: Path) -> None:
    texts = {"a": lines("alpha"), "b": lines("bravo")}
    for tag, rows in texts.items():
        (tmp_path / f"{tag}.txt").write_text("\n".join(rows) + "\n")
    # Both start while the lock is held, and run until they block on it, so they surely overlap:
    # both have loaded the same index before either can write (startup jitter is larger than
    # the time one add takes, so merely starting them together would rarely race).
    with index_lock(built, command="pytest: let both writers start"):
        procs = {tag: cli("index", "add", "--index-dir", str(built), "--input", str(tmp_path / f"{tag}.txt"),
                          "--threads", "1", "--lock-timeout", "300") for tag in texts}
        wait_until_blocked(list(procs.values()))
    out = {tag: p.communicate(timeout=300) for tag, p in procs.items()}
    for tag, p in procs.items():
        assert p.returncode == 0, out[tag]
    ids = {tag: issued_ids(out[tag][0]) for tag in texts}
    assert not set(ids["a"]) & set(ids["b"]), ids
    expected = dict(enumerate(BASE))
    for tag in texts:
        assert len(ids[tag]) == 300
        expected.update(zip(ids[tag], texts[tag], strict=True))
    assert len(expected) == 100 + 600
    check_on_disk(built, expected)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_and_cli_add_at_once_keep_both(built: Path, tmp_path: Path) -> None:
    key, port = "concurrency-key", free_port()
    server = cli("serve", "--index-dir", str(built), "--port", str(port), "--api-key", key, "--threads", "1",
                 "--log-level", "warning")
    auth = {"Authorization": f"Bearer {key}"}
    expected = dict(enumerate(BASE))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.time() + 120
            while True:
                assert server.poll() is None, server.communicate()
                assert time.time() < deadline, "diffcse serve did not come up"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)

            def add(text: str) -> None:
                r = client.post("/add", json={"texts": [text]}, headers=auth)
                assert r.status_code == 200 and r.json()["saved"], r.text
                (new_id,) = r.json()["ids"]
                assert new_id not in expected
                expected[new_id] = text

            add("server text before the cli")
            rows = lines("charlie")
            (tmp_path / "c.txt").write_text("\n".join(rows) + "\n")
            writer = cli("index", "add", "--index-dir", str(built), "--input", str(tmp_path / "c.txt"), "--threads", "1")
            n = 0
            while writer.poll() is None:  # the server writes while the CLI runs (each /add waits for the lock)
                add(f"server text {n} during the cli")
                n += 1
                time.sleep(0.2)  # each /add is a save: leave the 2 shared cores to the CLI too
            out, err = writer.communicate()
            assert writer.returncode == 0, err
            cli_ids = issued_ids(out)
            assert not set(cli_ids) & set(expected), "an id was issued twice"
            expected.update(zip(cli_ids, rows, strict=True))
            # The server's next save must keep the CLI's rows (it reloads what the CLI saved).
            add("server text after the cli")
            assert client.get("/health").json()["count"] == len(expected) == 100 + 300 + n + 2
            hit = client.post("/search", json={"queries": [rows[7]], "top_k": 1}).json()["results"][0][0]
            assert (hit["id"], hit["text"]) == (cli_ids[7], rows[7])
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    check_on_disk(built, expected)


@pytest.mark.slow
def test_second_writer_times_out_naming_the_holder(built: Path, tmp_path: Path) -> None:
    more = tmp_path / "more.txt"
    more.write_text("one more text\n")
    with index_lock(built, command="pytest holding the lock"):
        assert lock_holder(built)["pid"] == os.getpid()
        t0 = time.monotonic()
        proc = cli("index", "add", "--index-dir", str(built), "--input", str(more), "--threads", "1", "--lock-timeout", "1")
        out, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 >= 1
    assert proc.returncode == 2, (out, err)
    message = err.strip().splitlines()[-1]  # (transformers may print a progress bar before it)
    assert message.startswith("diffcse index add: error: "), err
    assert f"pid {os.getpid()}" in message and "pytest holding the lock" in message and str(built) in message
    assert "--lock-timeout" in message
    assert read_manifest(built).count == len(BASE) and lock_holder(built) is None


def vector_index(path: Path, n: int = 20, seed: int = 0) -> Path:
    """A small saved flat index of random vectors (no encoder)."""
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    idx = SearchIndex.create(DIM, "flat")
    idx.add_vectors(x, [f"row {i}" for i in range(n)])
    return idx.save(path)


def rows(k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """k random vectors and texts."""
    return np.random.default_rng(seed).normal(size=(k, DIM)), [f"seed {seed} row {i}" for i in range(k)]


def test_lock_in_one_process_threads_and_reentry(tmp_path: Path) -> None:
    path = vector_index(tmp_path / "idx")
    errors: list[BaseException] = []
    with index_lock(path, command="outer"):
        with index_lock(path):  # re-entrant in the holding thread (a save inside writer())
            pass

        def other() -> None:
            try:
                with index_lock(path, timeout=0.2):
                    pass
            except BaseException as err:  # noqa: BLE001 - checked in the main thread
                errors.append(err)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert lock_holder(path)["command"] == "outer"
    assert len(errors) == 1 and isinstance(errors[0], IndexLockedError)
    assert f"pid {os.getpid()}: outer" in str(errors[0])
    with index_lock(path, timeout=0):  # free again
        pass


def test_stale_copy_catches_up_or_refuses(tmp_path: Path) -> None:
    path = vector_index(tmp_path / "idx")
    stale_dirty, stale_clean, stale_writer = (SearchIndex.load(path) for _ in range(3))
    other = SearchIndex.load(path)
    assert other.add_vectors(*rows(5, 1)) == list(range(20, 25))
    other.save()
    # Unsaved changes on a copy older than the disk: refused, the other writer's rows kept.
    stale_dirty.add_vectors(*rows(3, 2))
    with pytest.raises(IndexConflictError, match=r"saved by another process.*writer\(\)"):
        stale_dirty.save()
    assert read_manifest(path).count == 25
    # No unsaved changes: save() first reloads, so it writes the disk's rows, not its old ones.
    stale_clean.save()
    assert read_manifest(path).count == 25 and len(stale_clean) == 25
    # writer(): reloads under the lock, so ids continue from the disk.
    with stale_writer.writer() as w:
        assert w.add_vectors(*rows(4, 3)) == [25, 26, 27, 28]
    assert read_manifest(path).count == 29 and read_manifest(path).next_id == 29
    # A failing block writes nothing and leaves memory as the disk.
    with pytest.raises(RuntimeError, match="boom"), stale_writer.writer():
        stale_writer.add_vectors(*rows(2, 4))
        raise RuntimeError("boom")
    assert read_manifest(path).count == len(stale_writer) == 29


def test_orphan_temp_files_are_swept_by_the_next_save(tmp_path: Path) -> None:
    path = vector_index(tmp_path / "idx")
    orphans = [path / ".manifest.json.x.tmp", path / ".manifest.json.k2j3h4.tmp"]
    for orphan in orphans:
        orphan.write_text('{"half": ')
    dead_staging = path / ".staging-999999999-deadbeef"
    dead_staging.mkdir()
    old_gen = path / "gen-000000-00000000"
    old_gen.mkdir()
    unrelated = [path / "notes.tmp", path / ".manifest.json"]
    for keep in unrelated:
        keep.write_text("mine")
    assert SearchIndex.load(path).delete([3]) == 1  # a change in memory only: nothing swept yet
    assert all(p.exists() for p in orphans)
    with SearchIndex.load(path).writer() as w:
        w.delete([3])
    assert not any(p.exists() for p in orphans) and not dead_staging.exists() and not old_gen.exists()
    assert all(p.read_text() == "mine" for p in unrelated)
    assert len(SearchIndex.load(path)) == 19


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("generation", "../etc"),
        ("generation", "../../../etc"),
        ("generation", "/etc"),
        ("generation", "gen-000001-1a2b3c4d/../../etc"),
        ("generation", "gen-000001-1a2b3c4d/"),
        ("files.index.name", "../../etc/index.faiss"),
        ("files.store.name", "/etc/passwd"),
        ("files.index.name", "sub/index.faiss"),
        ("files.store.name", ".."),
    ],
)
def test_manifest_cannot_point_outside_the_index(tmp_path: Path, field: str, value: str) -> None:
    path = vector_index(tmp_path / "idx")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    # A complete, valid copy of the index outside the folder: following the path would load it.
    shutil.copytree(path / manifest["generation"], tmp_path / "etc")
    if field == "generation":
        manifest["generation"] = value
    else:
        _, key, _ = field.split(".")
        manifest["files"][key]["name"] = value
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match=rf"manifest\.json: field '{re.escape(field)}' is .*refused"):
        SearchIndex.load(path)


def test_cli_refuses_traversal_and_file_index_dirs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = vector_index(tmp_path / "idx")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    (path / MANIFEST_NAME).write_text(json.dumps({**manifest, "generation": "../../../etc"}))
    capsys.readouterr()
    assert main(["index", "delete", "--index-dir", str(path), "--ids", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'generation'" in err and len(err.splitlines()) == 1
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for argv in (["index", "add", "--input", str(a_file)], ["index", "delete", "--ids", "1"], ["serve"],
                 ["search", "--query", "x"], ["index", "info"]):
        assert main([*argv, "--index-dir", str(a_file)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "is a file, not an index directory" in err and len(err.splitlines()) == 1, (argv, err)
