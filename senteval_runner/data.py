"""Locate the SentEval data tree and read every task's files the way SentEval reads them.

Faithfulness notes (each mirrors a detail of SentEval's loaders, so scores match it):
- STS12-16 input/gold files are read as UTF-8 with ``str.splitlines()`` (which also splits on
  \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028, \\u2029), and a pair is kept only if its gold
  line is exactly empty-string-free ('' drops it; whitespace does not).
- MR/CR/SUBJ/MPQA are read as Latin-1 with ``splitlines()``; TREC as Latin-1 line by line;
  SST2, MRPC, SICK and STS-B as UTF-8 line by line with ``strip().split('\\t')``.
- Every sentence is ``str.split()`` into tokens and re-joined with single spaces, which is
  what the SimCSE batcher hands to the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DOWNLOAD_HINT = "bash data/download_senteval.sh"

REPO_ROOT = Path(__file__).resolve().parents[1]

STS_SUBSETS: dict[str, list[str]] = {
    "STS12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13": ["FNWN", "headlines", "OnWN"],
    "STS14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}

TREC_LABELS = {"ABBR": 0, "DESC": 1, "ENTY": 2, "HUM": 3, "LOC": 4, "NUM": 5}


class SentEvalDataError(ValueError):
    """A SentEval data file is malformed (the message names file, line and field)."""


class SentEvalDataMissing(FileNotFoundError):
    """A SentEval data file or folder is missing (the message names it and the fix)."""


def resolve_data_dir(arg: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder that holds SentEval's ``downstream/`` tree.

    Order: explicit ``arg`` → env ``SENTEVAL_DATA`` → ``$DIFFCSE_DATA_DIR/senteval`` →
    ``<repo>/data/senteval``. The first one that is *set* wins (a set but wrong location is
    an error rather than a silent fall-through to another copy of the data).
    """
    if arg is not None and str(arg) != "":
        root, source = Path(arg), "--senteval-data"
    elif os.environ.get("SENTEVAL_DATA"):
        root, source = Path(os.environ["SENTEVAL_DATA"]), "$SENTEVAL_DATA"
    elif os.environ.get("DIFFCSE_DATA_DIR"):
        root, source = Path(os.environ["DIFFCSE_DATA_DIR"]) / "senteval", "$DIFFCSE_DATA_DIR/senteval"
    else:
        root, source = REPO_ROOT / "data" / "senteval", "default <repo>/data/senteval"
    root = root.expanduser()
    # Accept the downstream/ folder itself too: people point SentEval's task_path there.
    if root.name == "downstream" and not (root / "downstream").is_dir() and root.is_dir():
        root = root.parent
    if not (root / "downstream").is_dir():
        raise SentEvalDataMissing(
            f"SentEval data not found: {root / 'downstream'} does not exist (from {source}). "
            f"Fetch it with `{DOWNLOAD_HINT}` or point --senteval-data / SENTEVAL_DATA at the "
            "folder that holds downstream/."
        )
    return root


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise an error naming it and the download command."""
    if not path.is_file():
        raise SentEvalDataMissing(
            f"SentEval data file missing: {path}. Fetch the data with `{DOWNLOAD_HINT}`."
        )
    return path


def _read_text(path: Path, encoding: str) -> str:
    """Read a whole file with universal newlines, turning decode errors into line-numbered errors."""
    require_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SentEvalDataError(f"{path}:{line}: not valid {encoding} ({e.reason} at byte {e.start})") from None
    # io.open(newline=None) semantics: \r\n and lone \r become \n.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _iter_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) the way ``for line in io.open(path)`` does (only \\n splits)."""
    text = _read_text(path, encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    yield from enumerate(lines, start=1)


def join_tokens(s: str) -> str:
    """SentEval tokenises with ``str.split()``; SimCSE's batcher re-joins with one space."""
    return " ".join(s.split())


def _float(value: str, path: Path, lineno: int, what: str) -> float:
    """Parse a score field, naming the file/line/field on failure."""
    try:
        return float(value)
    except ValueError:
        raise SentEvalDataError(f"{path}:{lineno}: {what} is not a number: {value!r}") from None


def _int(value: str, path: Path, lineno: int, what: str) -> int:
    """Parse a label field, naming the file/line/field on failure."""
    try:
        return int(value)
    except ValueError:
        raise SentEvalDataError(f"{path}:{lineno}: {what} is not an integer: {value!r}") from None


def _fields(line: str, path: Path, lineno: int, need: int, what: str) -> list[str]:
    """Split a stripped line on tabs and check it has at least ``need`` fields."""
    parts = line.strip().split("\t")
    if len(parts) < need:
        raise SentEvalDataError(
            f"{path}:{lineno}: expected at least {need} tab-separated fields ({what}), got {len(parts)}"
        )
    return parts


@dataclass
class PairSplit:
    """Sentence pairs with gold scores (one STS subset or one split of STS-B/SICK)."""

    a: list[str]
    b: list[str]
    gold: np.ndarray

    def __len__(self) -> int:
        """Number of scored pairs."""
        return len(self.a)


@dataclass
class ClassifSplit:
    """Sentences (or sentence pairs) with integer labels."""

    x: list[str]
    y: np.ndarray
    x2: list[str] | None = None

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.x)


@dataclass
class TaskData:
    """All splits of one task, keyed by split/subset name, in SentEval's order."""

    name: str
    kind: str  # "sts" or "classif"
    splits: dict[str, PairSplit | ClassifSplit] = field(default_factory=dict)
    nclasses: int = 0

    def sentences(self) -> list[str]:
        """Every sentence the task needs embedded (with repeats)."""
        out: list[str] = []
        for s in self.splits.values():
            if isinstance(s, PairSplit):
                out += s.a + s.b
            else:
                out += s.x + (s.x2 or [])
        return out


# ---------------------------------------------------------------- STS12-16


def read_sts_subset(folder: Path, subset: str) -> PairSplit:
    """Read ``STS.input.<subset>.txt`` + ``STS.gs.<subset>.txt``, dropping pairs with an empty gold line."""
    inp = folder / f"STS.input.{subset}.txt"
    gs = folder / f"STS.gs.{subset}.txt"
    # splitlines(), not split('\n'): SentEval uses it, and it decides how lines align.
    in_lines = _read_text(inp, "utf-8").splitlines()
    gs_lines = _read_text(gs, "utf-8").splitlines()
    if len(in_lines) != len(gs_lines):
        raise SentEvalDataError(
            f"{inp}: {len(in_lines)} lines but {gs} has {len(gs_lines)}; SentEval pairs them line by line"
        )
    a: list[str] = []
    b: list[str] = []
    gold: list[float] = []
    for i, (line, g) in enumerate(zip(in_lines, gs_lines, strict=True), start=1):
        parts = line.split("\t")
        if len(parts) != 2:
            raise SentEvalDataError(
                f"{inp}:{i}: expected 2 tab-separated sentences, got {len(parts)} fields "
                "(raw STS16 files have 4; use the SentEval-processed tree)"
            )
        if g == "":
            continue
        gold.append(_float(g, gs, i, "gold score"))
        a.append(join_tokens(parts[0]))
        b.append(join_tokens(parts[1]))
    return PairSplit(a, b, np.asarray(gold, dtype=np.float64))


def load_sts(root: Path, task: str) -> TaskData:
    """Load STS12..STS16 (every subset, SentEval's subset order)."""
    year = task[3:]
    folder = root / "downstream" / "STS" / f"STS{year}-en-test"
    td = TaskData(task, "sts")
    for subset in STS_SUBSETS[task]:
        td.splits[subset] = read_sts_subset(folder, subset)
    return td


# ---------------------------------------------------------------- STS-B and SICK-R


def read_stsb_file(path: Path) -> PairSplit:
    """Read an STS-B csv (score in column 5, sentences in 6 and 7; extra columns ignored)."""
    a, b, gold = [], [], []
    for i, line in _iter_lines(path, "utf-8"):
        parts = _fields(line, path, i, 7, "genre, file, year, id, score, sentence1, sentence2")
        gold.append(_float(parts[4], path, i, "score (column 5)"))
        a.append(join_tokens(parts[5]))
        b.append(join_tokens(parts[6]))
    return PairSplit(a, b, np.asarray(gold, dtype=np.float64))


def read_sick_file(path: Path) -> PairSplit:
    """Read a SICK file (header skipped; sentence_A, sentence_B, relatedness_score)."""
    a, b, gold = [], [], []
    for i, line in _iter_lines(path, "utf-8"):
        if i == 1:
            continue
        parts = _fields(line, path, i, 4, "pair_ID, sentence_A, sentence_B, relatedness_score")
        gold.append(_float(parts[3], path, i, "relatedness_score (column 4)"))
        a.append(join_tokens(parts[1]))
        b.append(join_tokens(parts[2]))
    return PairSplit(a, b, np.asarray(gold, dtype=np.float64))


STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_FILES = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def load_stsb(root: Path, splits: tuple[str, ...] = ("dev", "test")) -> TaskData:
    """Load STSBenchmark for unsupervised cosine scoring (only the requested splits)."""
    folder = root / "downstream" / "STS" / "STSBenchmark"
    td = TaskData("STSBenchmark", "sts")
    for s in splits:
        td.splits[s] = read_stsb_file(folder / STSB_FILES[s])
    return td


def load_sick_r(root: Path, splits: tuple[str, ...] = ("dev", "test")) -> TaskData:
    """Load SICK relatedness for unsupervised cosine scoring (only the requested splits)."""
    folder = root / "downstream" / "SICK"
    td = TaskData("SICKRelatedness", "sts")
    for s in splits:
        td.splits[s] = read_sick_file(folder / SICK_FILES[s])
    return td


# ---------------------------------------------------------------- transfer tasks

BINARY_FILES = {
    "MR": ("MR", "rt-polarity.pos", "rt-polarity.neg"),
    "CR": ("CR", "custrev.pos", "custrev.neg"),
    "SUBJ": ("SUBJ", "subj.objective", "subj.subjective"),
    "MPQA": ("MPQA", "mpqa.pos", "mpqa.neg"),
}


def read_latin1_lines(path: Path) -> list[str]:
    """Read a one-sentence-per-line Latin-1 file with ``splitlines()``, as SentEval's binary tasks do."""
    return [join_tokens(s) for s in _read_text(path, "latin-1").splitlines()]


def _ntok(s: str) -> int:
    """Token count of a re-joined sentence (``len(s.split())`` of the original line)."""
    return len(s.split())


def load_binary(root: Path, task: str) -> TaskData:
    """Load MR/CR/SUBJ/MPQA: label 1 for the first file, 0 for the second, SentEval-sorted."""
    sub, pos_name, neg_name = BINARY_FILES[task]
    folder = root / "downstream" / sub
    pos = read_latin1_lines(folder / pos_name)
    neg = read_latin1_lines(folder / neg_name)
    xs = pos + neg
    ys = [1] * len(pos) + [0] * len(neg)
    # Stable sort by (length, label): StratifiedKFold folds follow this order.
    order = sorted(range(len(xs)), key=lambda i: (_ntok(xs[i]), ys[i]))
    td = TaskData(task, "classif", nclasses=2)
    td.splits["all"] = ClassifSplit([xs[i] for i in order], np.asarray([ys[i] for i in order], dtype=np.int64))
    return td


def read_trec_file(path: Path) -> tuple[list[str], list[int]]:
    """Read a TREC .label file (Latin-1; coarse label before ':', first word is the fine label)."""
    xs, ys = [], []
    for i, line in _iter_lines(path, "latin-1"):
        s = line.strip()
        if ":" not in s:
            raise SentEvalDataError(f"{path}:{i}: expected 'COARSE:fine question', got {s[:60]!r}")
        target, sample = s.split(":", 1)
        if target not in TREC_LABELS:
            raise SentEvalDataError(f"{path}:{i}: unknown coarse label {target!r}")
        rest = sample.split(" ", 1)
        if len(rest) < 2:
            raise SentEvalDataError(f"{path}:{i}: no question text after the fine label")
        xs.append(join_tokens(rest[1]))
        ys.append(TREC_LABELS[target])
    return xs, ys


def _sorted_single(xs: list[str], ys: list[int]) -> ClassifSplit:
    """Apply SentEval's (length, label) stable sort to a single-sentence split."""
    order = sorted(range(len(xs)), key=lambda i: (_ntok(xs[i]), ys[i]))
    return ClassifSplit([xs[i] for i in order], np.asarray([ys[i] for i in order], dtype=np.int64))


def load_trec(root: Path) -> TaskData:
    """Load TREC train/test (6 coarse classes), SentEval-sorted."""
    folder = root / "downstream" / "TREC"
    td = TaskData("TREC", "classif", nclasses=6)
    td.splits["train"] = _sorted_single(*read_trec_file(folder / "train_5500.label"))
    td.splits["test"] = _sorted_single(*read_trec_file(folder / "TREC_10.label"))
    return td


def read_sst_file(path: Path) -> tuple[list[str], list[int]]:
    """Read a SentEval SST binary file (``text<TAB>label``, UTF-8)."""
    xs, ys = [], []
    for i, line in _iter_lines(path, "utf-8"):
        parts = _fields(line, path, i, 2, "text, label")
        ys.append(_int(parts[1], path, i, "label (column 2)"))
        xs.append(join_tokens(parts[0]))
    if ys and max(ys) != 1:
        raise SentEvalDataError(f"{path}: binary SST labels must be 0/1, max is {max(ys)}")
    return xs, ys


def load_sst2(root: Path) -> TaskData:
    """Load SST2 train/dev/test, SentEval-sorted."""
    folder = root / "downstream" / "SST" / "binary"
    td = TaskData("SST2", "classif", nclasses=2)
    for s in ("train", "dev", "test"):
        td.splits[s] = _sorted_single(*read_sst_file(folder / f"sentiment-{s}"))
    return td


def read_mrpc_file(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Read an MRPC file (header dropped; Quality, #1 ID, #2 ID, #1 String, #2 String)."""
    a, b, ys = [], [], []
    for i, line in _iter_lines(path, "utf-8"):
        if i == 1:
            continue
        parts = _fields(line, path, i, 5, "Quality, #1 ID, #2 ID, #1 String, #2 String")
        ys.append(_int(parts[0], path, i, "Quality (column 1)"))
        a.append(join_tokens(parts[3]))
        b.append(join_tokens(parts[4]))
    return a, b, ys


def load_mrpc(root: Path) -> TaskData:
    """Load MRPC train/test, sorted by (len A, len B, label) as SentEval does."""
    folder = root / "downstream" / "MRPC"
    td = TaskData("MRPC", "classif", nclasses=2)
    for s in ("train", "test"):
        a, b, ys = read_mrpc_file(folder / f"msr_paraphrase_{s}.txt")
        order = sorted(range(len(a)), key=lambda i: (_ntok(a[i]), _ntok(b[i]), ys[i]))
        td.splits[s] = ClassifSplit(
            [a[i] for i in order], np.asarray([ys[i] for i in order], dtype=np.int64), [b[i] for i in order]
        )
    return td


STS_TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
TRANSFER_TASKS = ["MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC"]
ALL_TASKS = STS_TASKS + TRANSFER_TASKS


def load_task(root: Path, task: str, pair_splits: tuple[str, ...] = ("dev", "test")) -> TaskData:
    """Load one task by its SentEval name."""
    if task in STS_SUBSETS:
        return load_sts(root, task)
    if task == "STSBenchmark":
        return load_stsb(root, pair_splits)
    if task == "SICKRelatedness":
        return load_sick_r(root, pair_splits)
    if task in BINARY_FILES:
        return load_binary(root, task)
    if task == "TREC":
        return load_trec(root)
    if task == "SST2":
        return load_sst2(root)
    if task == "MRPC":
        return load_mrpc(root)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")
