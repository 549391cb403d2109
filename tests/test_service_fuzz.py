"""Schemathesis over the service's own OpenAPI document, in-process (ASGI): no 500s, no schema violations.

Every operation gets schema-valid and schema-invalid requests (the write endpoints with the API
key), from schemathesis's examples, coverage (boundary values) and fuzzing phases; every check
runs on each answer: no server error, status codes, content types and bodies as documented,
valid data accepted, invalid data rejected, auth not ignored.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import pytest  # noqa: E402

schemathesis = pytest.importorskip("schemathesis")

from conftest import build_tiny_model, sentences  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from diffcse.core.encoder import Encoder  # noqa: E402
from diffcse.search import SearchIndex  # noqa: E402
from diffcse.search.service import ServiceLimits, create_app  # noqa: E402

faiss.omp_set_num_threads(1)
KEY = "fuzz-key"
# Small limits keep each generated request cheap to encode on 2 cores.
LIMITS = ServiceLimits(max_batch=4, max_text_chars=64, max_top_k=20, max_body_bytes=64 * 1024)

# The schema must exist when pytest collects the tests (schemathesis parametrizes one test per
# operation from it), so the app is built at import, on the same tiny BERT the `tiny_bert_dir`
# fixture builds. (schemathesis.pytest.from_fixture would defer this, but schemathesis 4.32 reads
# a private pytest attribute that pytest 9 no longer has.)
_TMP = tempfile.TemporaryDirectory(prefix="diffcse-fuzz-")
_ENCODER = Encoder.load(str(build_tiny_model(Path(_TMP.name) / "tiny_bert")), pooler="avg")
SearchIndex.build(_ENCODER, sentences(60, seed=5), kind="hnsw").save(Path(_TMP.name) / "idx")
INDEX = SearchIndex.load(Path(_TMP.name) / "idx", encoder=_ENCODER)
# persist='add': every fuzzed write goes through the writer lock and a save. schemathesis's
# in-process client sends Host: testserver, which is therefore allowed.
APP = create_app(INDEX, limits=LIMITS, persist="add", api_key=KEY, allowed_hosts=["testserver"])
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    """Close the index and remove the temp folder once the module's tests are done."""
    yield
    INDEX.close()
    _TMP.cleanup()


def _align_metadata(case: schemathesis.Case) -> None:
    """Give a schema-valid /add body one metadata entry per text.

    The one rule of the API that JSON Schema cannot state (the operation's description says it);
    only positive cases are touched, so a deliberately invalid body stays invalid.
    """
    body = case.body
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.path != "/add" or not positive or not isinstance(body, dict):
        return
    texts, meta = body.get("texts"), body.get("metadata")
    if isinstance(texts, list) and isinstance(meta, list) and texts and len(meta) != len(texts):
        body["metadata"] = (meta + [None] * len(texts))[: len(texts)]


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case: schemathesis.Case) -> None:
    _align_metadata(case)
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"})
