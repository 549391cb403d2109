"""The index manifest: what an index directory holds and how it was built, plus atomic file helpers."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffcse.core.io import sha256_file
from diffcse.search.errors import CorruptIndexError, IndexFormatError

# 2: document ids (items.doc_id) and the FTS5 full-text index in the store. Format 1 indexes load
# (the store is upgraded in memory) and are written as format 2 by their next save.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
INDEX_FILE = "index.faiss"
STORE_FILE = "store.sqlite"
KINDS = ("flat", "ivf", "hnsw", "ivfpq", "ivfsq8")
# The names save() writes. The manifest is data from disk: anything else (`../..`, `/etc`, `a/b`)
# would make load() read outside the index folder, so it is refused, never followed.
GENERATION_RE = re.compile(r"gen-\d{6,}-[0-9a-f]{8}")
FILE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass
class Manifest:
    """Everything needed to reopen an index and check it matches an encoder."""

    dim: int
    kind: str
    params: dict = field(default_factory=dict)
    count: int = 0
    next_id: int = 0
    # faiss's ntotal: equals count except for HNSW, where deleted vectors stay as tombstones.
    ntotal: int = 0
    metric: str = "inner_product"
    normalized: bool = True
    model: dict | None = None
    generation: str = ""
    files: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: float = 0.0
    updated_at: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, source: str) -> Manifest:
        """Validate a parsed manifest; errors name the source file and the bad field."""
        if not isinstance(data, dict):
            raise IndexFormatError(f"{source}: manifest is not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise IndexFormatError(f"{source}: field 'format_version' is missing or not an integer")
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{source}: index format version {version} is newer than this diffcse reads "
                f"(up to {FORMAT_VERSION}); upgrade diffcse to open it"
            )
        if version < 1:
            raise IndexFormatError(f"{source}: field 'format_version' must be >= 1, got {version}")
        types = {
            "dim": int, "kind": str, "params": dict, "count": int, "next_id": int, "ntotal": int,
            "metric": str, "normalized": bool, "generation": str, "files": dict,
        }
        for name, kind in types.items():
            value = data.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise IndexFormatError(f"{source}: field {name!r} is missing or not a {kind.__name__}")
        if data["kind"] not in KINDS:
            raise IndexFormatError(f"{source}: field 'kind' is {data['kind']!r}; expected one of {', '.join(KINDS)}")
        if data["metric"] != "inner_product":
            raise IndexFormatError(f"{source}: field 'metric' is {data['metric']!r}; only 'inner_product' is supported")
        if data["dim"] < 1:
            raise IndexFormatError(f"{source}: field 'dim' must be positive, got {data['dim']}")
        if data.get("model") is not None and not isinstance(data["model"], dict):
            raise IndexFormatError(f"{source}: field 'model' must be an object or null")
        if not GENERATION_RE.fullmatch(data["generation"]):
            raise IndexFormatError(
                f"{source}: field 'generation' is {_short(data['generation'])}, not a generation folder name "
                "like 'gen-000001-1a2b3c4d' (refused: it could point outside the index folder)"
            )
        for key in ("index", "store"):
            entry = data["files"].get(key)
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("bytes"), int):
                raise IndexFormatError(f"{source}: field 'files.{key}' is missing or lacks name/bytes")
            if not FILE_NAME_RE.fullmatch(entry["name"]):
                raise IndexFormatError(
                    f"{source}: field 'files.{key}.name' is {_short(entry['name'])}, not a plain file name "
                    "(refused: it could point outside the generation folder)"
                )
        vectors = data["files"].get("vectors")
        if vectors is not None and (
            not isinstance(vectors, dict) or not isinstance(vectors.get("name"), str)
            or not isinstance(vectors.get("rows"), int) or not FILE_NAME_RE.fullmatch(vectors["name"])
        ):
            raise IndexFormatError(f"{source}: field 'files.vectors' lacks a plain file name or its rows")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _short(value: str) -> str:
    """A crafted value for an error message: repr'd, and cut so the message stays one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_manifest(index_dir: str | Path) -> Manifest:
    """Read and validate index_dir/manifest.json."""
    path = Path(index_dir) / MANIFEST_NAME
    if Path(index_dir).exists() and not Path(index_dir).is_dir():
        raise FileNotFoundError(f"{index_dir} is a file, not an index directory")
    if not Path(index_dir).is_dir():
        raise FileNotFoundError(f"index directory {index_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{index_dir} is not an index directory: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"{path}: manifest is not valid JSON ({err})") from None
    return Manifest.from_dict(data, str(path))


def check_file(path: Path, entry: dict, verify: bool) -> None:
    """Raise CorruptIndexError when a file is missing, has the wrong size or (verify) checksum."""
    if not path.is_file():
        raise CorruptIndexError(f"index file {path} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CorruptIndexError(
            f"index file {path} is {size} bytes but the manifest says {entry['bytes']}: truncated or overwritten"
        )
    if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        raise CorruptIndexError(f"index file {path} does not match its sha256 in the manifest: corrupted")
