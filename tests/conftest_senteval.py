"""Helpers for the senteval_runner tests: a tiny SentEval tree written to disk and a toy encoder."""

from __future__ import annotations

import os
import zlib
from functools import cache
from pathlib import Path

import numpy as np

from senteval_runner.data import STS_SUBSETS

VOCAB = ("a man woman dog cat is are was the plays runs eats guitar ball food house car red blue "
         "big small very quite on in at with fast slowly happy sad movie film plot actor").split()
POS_WORDS = ["good", "great", "excellent", "fine"]
NEG_WORDS = ["bad", "awful", "poor", "boring"]


def toy_encode(sentences: list[str], dim: int = 32) -> np.ndarray:
    """Deterministic bag-of-words vectors: each token hashes to a fixed random vector."""
    out = np.zeros((len(sentences), dim), dtype=np.float32)
    for i, s in enumerate(sentences):
        for tok in s.split():
            out[i] += _token_vector(tok, dim)
    return out


@cache
def _token_vector(tok: str, dim: int) -> np.ndarray:
    """The fixed random vector of one token (seeded by its CRC32)."""
    return np.random.RandomState(zlib.crc32(tok.encode("utf-8"))).normal(size=dim).astype(np.float32)


def _sentence(rng: np.random.RandomState, n: int | None = None, extra: list[str] | None = None) -> str:
    """A random sentence from VOCAB, optionally with extra words mixed in."""
    words = list(rng.choice(VOCAB, size=n or rng.randint(3, 9)))
    for w in extra or []:
        words.insert(rng.randint(0, len(words) + 1), w)
    return " ".join(words)


def _write(path: Path, text: str, encoding: str = "utf-8") -> None:
    """Write a file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))


def _pair_lines(rng: np.random.RandomState, n: int) -> tuple[list[str], list[str], list[float]]:
    """Sentence pairs whose gold score grows with word overlap, so cosine correlates with it."""
    a, b, g = [], [], []
    for _ in range(n):
        s1 = _sentence(rng, 6)
        keep = rng.randint(0, 7)
        w1 = s1.split()
        s2 = " ".join(w1[:keep] + list(rng.choice(VOCAB, size=6 - keep)))
        a.append(s1)
        b.append(s2)
        g.append(round(5.0 * keep / 6 + rng.uniform(-0.3, 0.3), 3))
    return a, b, g


def make_tree(root: Path, n_classif: int = 60, seed: int = 0) -> Path:
    """Write a small but complete SentEval downstream/ tree under root; returns root."""
    rng = np.random.RandomState(seed)
    ds = root / "downstream"
    for task, subsets in STS_SUBSETS.items():
        folder = ds / "STS" / f"STS{task[3:]}-en-test"
        for sub in subsets:
            a, b, g = _pair_lines(rng, 24)
            gold = [f"{x}" for x in g]
            gold[3] = ""  # unscored pair: SentEval drops it
            _write(folder / f"STS.input.{sub}.txt", "".join(f"{x}\t{y}\n" for x, y in zip(a, b, strict=True)))
            _write(folder / f"STS.gs.{sub}.txt", "".join(f"{x}\n" for x in gold))
    for split in ("train", "dev", "test"):
        a, b, g = _pair_lines(rng, 30)
        rows = [f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s:.3f}\t{x}\t{y}" for i, (x, y, s) in enumerate(zip(a, b, g, strict=True))]
        rows[1] += "\tsrc1\tsrc2"  # a 9-column row, as in the original STS-B test file
        _write(ds / "STS" / "STSBenchmark" / f"sts-{split}.csv", "\n".join(rows) + "\n")
    for name in ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt"):
        a, b, g = _pair_lines(rng, 30)
        rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
        rows += [f"{i}\t{x}\t{y}\t{1 + 4 * s / 5:.1f}\tNEUTRAL" for i, (x, y, s) in enumerate(zip(a, b, g, strict=True))]
        eol = "\r\n" if name == "SICK_test_annotated.txt" else "\n"  # CRLF as distributed
        _write(ds / "SICK" / name, eol.join(rows) + eol)

    def polar(n: int, words: list[str]) -> list[str]:
        """n sentences, each with one word of the given polarity."""
        return [_sentence(rng, extra=[str(rng.choice(words))]) for _ in range(n)]

    for task, (p, q) in {"MR": ("rt-polarity.pos", "rt-polarity.neg"), "CR": ("custrev.pos", "custrev.neg"),
                         "SUBJ": ("subj.objective", "subj.subjective"), "MPQA": ("mpqa.pos", "mpqa.neg")}.items():
        _write(ds / task / p, "\n".join(polar(n_classif // 2, POS_WORDS)) + "\n", "latin-1")
        _write(ds / task / q, "\n".join(polar(n_classif - n_classif // 2, NEG_WORDS)) + "\n", "latin-1")
    for split, n in (("train", n_classif * 2), ("dev", n_classif // 2), ("test", n_classif // 2)):
        lines = []
        for _ in range(n):
            y = rng.randint(0, 2)
            lines.append(f"{_sentence(rng, extra=[str(rng.choice(POS_WORDS if y else NEG_WORDS))])}\t{y}")
        _write(ds / "SST" / "binary" / f"sentiment-{split}", "\n".join(lines) + "\n")
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    for name, n in (("train_5500.label", n_classif * 2), ("TREC_10.label", n_classif // 2)):
        lines = []
        for i in range(n):
            lab = labels[i % 6]
            lines.append(f"{lab}:fine {_sentence(rng, extra=[lab.lower()] * 2)} ?")
        _write(ds / "TREC" / name, "\n".join(lines) + "\n", "latin-1")
    for split, n in (("train", n_classif * 2), ("test", n_classif // 2)):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            s1 = _sentence(rng, 7)
            y = rng.randint(0, 2)
            s2 = s1 if y else _sentence(rng, 7)
            rows.append(f"{y}\t{i}\t{i + 1000}\t{s1}\t{s2}")
        _write(ds / "MRPC" / f"msr_paraphrase_{split}.txt", "\n".join(rows) + "\n")
    return root


def real_data_dir() -> Path | None:
    """The shared SentEval data if $DIFFCSE_DATA_DIR points at it, else None."""
    base = os.environ.get("DIFFCSE_DATA_DIR")
    if not base:
        return None
    root = Path(base) / "senteval"
    return root if (root / "downstream").is_dir() else None
