"""Small file helpers used everywhere: atomic writers, the line reader, checksums, the data root.

Every file diffcse writes for a user (models, arrays, indexes, reports) goes through `atomic_path`:
a temp file in the target's own folder, fsynced, then renamed over the target, so a crash leaves
either the old file or the new one and never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffcse.core.errors import InputError

ENCODING_ERRORS = ("strict", "replace")


def _umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`, else delete it.

    The temp name starts with '.' and the target's name, so an orphan (a killed process) is easy to
    recognise and never mistaken for the real file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file 0600; give it the mode a plain open() would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write bytes to path atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def finite_json(obj: object) -> object:
    """A copy of obj in which NaN and ±Infinity (not valid JSON) are None; numpy scalars become Python."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    elif hasattr(obj, "tolist") and callable(obj.tolist):
        return finite_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: object, indent: int | None = 2) -> str:
    """Strict JSON text (non-finite numbers written as null, never as NaN/Infinity)."""
    return json.dumps(finite_json(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def read_json(path: str | os.PathLike[str]) -> dict | None:
    """A JSON file's mapping, or None when it is missing or unreadable (e.g. a run killed before writing it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: str | os.PathLike[str], obj: object) -> Path:
    """Write obj as strict JSON to path atomically; returns the path."""
    return write_bytes_atomic(path, (dumps_json(obj) + "\n").encode("utf-8"))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 text to path atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Line:
    """One non-empty line of a text file: its 1-based number and its stripped text."""

    lineno: int
    text: str
    replaced: bool = False


def decode_line(raw: bytes, path: str | os.PathLike[str], lineno: int, encoding_errors: str = "strict") -> tuple[str, bool]:
    """UTF-8 text of one raw line and whether bytes were replaced; bad bytes are an error naming file:line."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as err:
        if encoding_errors != "replace":
            raise InputError(
                f"{path}:{lineno}: invalid UTF-8 at byte {err.start} of the line "
                "(fix the file, or pass --encoding-errors replace)"
            ) from None
        return raw.decode("utf-8", errors="replace"), True


def check_input_file(path: str | os.PathLike[str], what: str = "input file") -> Path:
    """The path, if it names an existing file; else an error that says what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    return path


def iter_lines(
    path: str | os.PathLike[str],
    what: str = "input file",
    encoding_errors: str = "strict",
    keep_empty: bool = False,
) -> Iterator[Line]:
    """Stream the stripped lines of a UTF-8 file (empty ones only with keep_empty), errors naming file:line.

    `what` names the file in messages ("training file", "input file", ...). With
    encoding_errors='replace' invalid bytes become U+FFFD and the line is flagged `replaced`.
    """
    if encoding_errors not in ENCODING_ERRORS:
        raise InputError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, not {encoding_errors!r}")
    path = check_input_file(path, what)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            text, replaced = decode_line(raw.rstrip(b"\r\n"), path, lineno, encoding_errors)
            text = text.strip()
            if text or keep_empty:
                yield Line(lineno, text, replaced)


def split_fields(line: Line, path: str | os.PathLike[str], need: int, what: str) -> list[str]:
    """The tab-separated, stripped fields of a line; a wrong count or an empty field names file:line.

    `what` names the fields, comma-separated ("sentence1, sentence2, score").
    """
    parts = [p.strip() for p in line.text.split("\t")]
    if len(parts) != need:
        raise InputError(f"{path}:{line.lineno}: expected {need} tab-separated fields ({what}), got {len(parts)}")
    for i, part in enumerate(parts, start=1):
        if not part:
            raise InputError(f"{path}:{line.lineno}: field {i} ({what.split(', ')[i - 1]}) is empty")
    return parts


def _finite(text: str) -> float | None:
    """The field as a finite float, or None when it is not one."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_scored_pairs(path: str | os.PathLike[str], what: str = "STS file") -> tuple[list[str], list[str], list[float]]:
    """A user STS file: `sentence1<TAB>sentence2<TAB>score` a line, UTF-8, optional header; errors name file:line.

    A first line whose score field is not a number is a header. At least two pairs with scores
    that vary are required (a correlation needs them).
    """
    fields = "sentence1, sentence2, score"
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    for n, line in enumerate(iter_lines(path, what)):
        parts = [p.strip() for p in line.text.split("\t")]
        if n == 0 and len(parts) == 3 and _finite(parts[2]) is None:
            continue  # the first non-empty line, with a non-numeric score: the header
        s1, s2, raw = split_fields(line, path, 3, fields)
        value = _finite(raw)
        if value is None:
            raise InputError(f"{path}:{line.lineno}: score is not a finite number: {raw!r}")
        a.append(s1)
        b.append(s2)
        gold.append(value)
    if len(gold) < 2:
        raise InputError(f"{path}: {len(gold)} scored pair(s); a correlation needs at least 2")
    if len(set(gold)) < 2:
        raise InputError(f"{path}: every gold score is {gold[0]}; a correlation needs scores that vary")
    return a, b, gold


def read_csv_columns(
    path: str | os.PathLike[str],
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    what: str = "input file",
    encoding_errors: str = "strict",
) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Rows of a CSV with a header: the required columns and those optional ones present (in that order).

    Every field must be non-empty; errors name the file and line (quoted fields may span lines).
    """
    import csv
    import io

    path = check_input_file(path, what)
    text = "".join(
        decode_line(raw, path, lineno, encoding_errors)[0]
        for lineno, raw in enumerate(path.read_bytes().splitlines(keepends=True), start=1)
    )
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    need = ",".join(required) + "".join(f"[,{c}]" for c in optional)
    for column in required:
        if column not in header:
            raise InputError(f"{path}: header {header} lacks the column {column!r} (need {need})")
    columns = (*required, *(c for c in optional if c in header))
    rows: list[tuple[str, ...]] = []
    for row in reader:
        values = tuple((row.get(c) or "").strip() for c in columns)
        for column, value in zip(columns, values, strict=True):
            if not value:
                raise InputError(f"{path}:{reader.line_num}: empty field {column!r}")
        rows.append(values)
    return columns, rows


def read_yaml_file(path: str | os.PathLike[str], what: str = "config file") -> object:
    """A YAML file's content (None when empty); a missing file, bad bytes or bad YAML name the file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{where}: malformed YAML ({problem})") from None


def data_root() -> Path:
    """The data root: $DIFFCSE_DATA_DIR, else the checkout's data/ folder."""
    env = os.environ.get("DIFFCSE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data"


def default_corpus() -> Path:
    """The default unlabeled corpus under the data root."""
    return data_root() / "corpus" / "derived" / "sentences.txt"


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as recorded in reports: relative to the working folder when inside it, else its name.

    Results are shared between machines, so they never hold another machine's absolute paths.
    """
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name
