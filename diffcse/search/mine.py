"""Hard-negative mining: (anchor, positive) pairs plus a corpus become the sent0,sent1,hard_neg CSV sup-simcse trains on.

For each anchor the corpus is searched with our FAISS index; the top `skip_top` candidates are
skipped (they are too often paraphrases: false negatives), and of those ranked skip_top+1 ..
depth the first one that is neither the anchor nor its positive and scores at most
`margin` × the positive's score (a relative-margin filter against false negatives) becomes the
hard negative. Pairs with no such candidate are left out and counted.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffcse.core.encoder import Encoder
from diffcse.core.errors import InputError
from diffcse.core.io import read_csv_columns, write_text_atomic
from diffcse.search.index import SearchIndex

PAIR_COLUMNS = ("sent0", "sent1")


@dataclass
class MineStats:
    """What mining did with each pair."""

    pairs: int = 0
    written: int = 0
    skipped_same_text: int = 0  # candidates equal to the anchor or the positive
    dropped_by_margin: int = 0  # candidates scoring above margin x the positive's score
    no_candidate: int = 0  # pairs left out: nothing in the window passed


def read_pairs(path: str | Path, encoding_errors: str = "strict") -> list[tuple[str, str]]:
    """A CSV with a header naming sent0 and sent1 (other columns are ignored)."""
    _, rows = read_csv_columns(path, PAIR_COLUMNS, (), "pair file", encoding_errors)
    if not rows:
        raise InputError(f"pair file {path} has no pairs")
    return [(a, b) for a, b in rows]


def mine(
    encoder: Encoder,
    index: SearchIndex,
    pairs: list[tuple[str, str]],
    skip_top: int = 10,
    depth: int = 50,
    margin: float = 0.95,
    batch_size: int = 64,
) -> tuple[list[tuple[str, str, str]], MineStats]:
    """(anchor, positive, hard negative) rows and the counts of what was skipped."""
    if not 0 <= skip_top < depth:
        raise InputError(f"--skip-top {skip_top} must be >= 0 and below --depth {depth}")
    anchors = encoder.encode([a for a, _ in pairs], batch_size=batch_size, normalize=True)
    positives = encoder.encode([p for _, p in pairs], batch_size=batch_size, normalize=True)
    positive_scores = np.einsum("ij,ij->i", anchors, positives)
    stats = MineStats(pairs=len(pairs))
    rows: list[tuple[str, str, str]] = []
    for (anchor, positive), hits, limit in zip(
        pairs, index.search_vectors(anchors, top_k=depth), margin * positive_scores, strict=True
    ):
        chosen = None
        for hit in hits[skip_top:]:
            if hit.text in (anchor, positive):
                stats.skipped_same_text += 1
            elif hit.score > limit:
                stats.dropped_by_margin += 1
            else:
                chosen = hit.text
                break
        if chosen is None:
            stats.no_candidate += 1
        else:
            rows.append((anchor, positive, chosen))
    stats.written = len(rows)
    return rows, stats


def write_triples(path: str | Path, rows: list[tuple[str, str, str]]) -> None:
    """Write sent0,sent1,hard_neg rows as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("sent0", "sent1", "hard_neg"))
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def stats_dict(stats: MineStats) -> dict:
    """The counts as a plain dict (for the command's report line)."""
    return asdict(stats)
