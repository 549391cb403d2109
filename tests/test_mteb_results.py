"""`diffcse eval --mteb-dir`: files mteb's own loader reads, holding the numbers of our report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest_senteval import make_tree, real_data_dir

from diffcse.cli import main
from diffcse.core.encoder import Encoder
from diffcse.evaluation.mteb import MTEB_TASKS, OWN_TASKS

mteb = pytest.importorskip("mteb")


def test_mteb_dir_loads_with_mtebs_loader_and_matches_the_report(tiny_bert_dir: str, tmp_path: Path) -> None:
    from mteb.cache import ResultCache
    from mteb.models.model_meta import ModelMeta

    root = make_tree(tmp_path / "senteval")
    cache = tmp_path / "mteb-cache"
    assert main(["eval", "--model", tiny_bert_dir, "--senteval-data", str(root), "--task-set", "sts",
                 "--mteb-dir", str(cache / "results"), "--output", str(tmp_path / "report.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    results = ResultCache(cache_path=cache).load_results(include_remote=False, require_model_meta=True)
    (model,) = results.model_results
    assert model.model_name == f"local/{Path(tiny_bert_dir).name}"
    assert model.model_revision == Encoder.load(tiny_bert_dir).fingerprint  # the weights' hash
    loaded = {t.task_name: t for t in model.task_results}
    # MTEB's names only where the data and the aggregation are MTEB's; never SICK-R or STSBenchmark.
    assert set(loaded) == {"STS12", "STS13", "STS14", "STS15", "STS16", "SentEval-STSBenchmark", "SentEval-SICK-R"}
    for task in ("STS12", "STS13", "STS14", "STS15", "STS16"):
        res = loaded[task]
        ours = report["results"][task]["all"]
        assert res.get_score() == ours["spearman"]["all"]
        assert res.scores["test"][0]["cosine_pearson"] == ours["pearson"]["all"]
        task_meta = mteb.get_task(task)
        assert res.dataset_revision == task_meta.metadata.revision  # the dataset whose pairs we score
        assert task_meta.metadata.main_score == "cosine_spearman"
        res.validate_and_filter_scores(task_meta)  # splits and languages are the ones MTEB's task expects
    for task, name in OWN_TASKS.items():
        for split in ("dev", "test"):
            assert loaded[name].get_score(splits=[split]) == report["results"][task][split]["spearman"]
    assert 100 * loaded["STS13"].get_score() == pytest.approx(report["table"]["sts"]["STS13"], abs=0.005)
    meta_file = next((cache / "results").glob("*/*/model_meta.json"))
    meta = ModelMeta.model_validate_json_resolved(meta_file.read_text())
    assert meta.embed_dim == 32 and meta.similarity_fn_name == "cosine"
    assert report["mteb"]["files"][-1] == "model_meta.json"


def test_mteb_dir_is_refused_without_an_sts_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--task-set", "transfer", "--mteb-dir", str(tmp_path)]) == 2
    assert "--mteb-dir: none of the tasks evaluated" in capsys.readouterr().err
    assert main(["eval", "--tasks", "STS12", "--mteb-dir", str(tmp_path), "--mteb-model-name", "tiny"]) == 2
    assert "--mteb-model-name: 'tiny' is not organization/model" in capsys.readouterr().err


def test_the_mapping_holds_on_the_real_data() -> None:
    """STS12-16: MTEB's pairs and gold scores; STS-B: the same pairs but other text; SICK-R: other pairs."""
    root = real_data_dir()
    if root is None:
        pytest.skip("DIFFCSE_DATA_DIR with senteval/ is not set")
    from senteval_runner.data import load_task

    def ours(task: str) -> tuple[int, float, int, int]:
        a, b, gold = [], [], []
        for split in load_task(root, task, ("test",)).splits.values():
            a, b, gold = a + split.a, b + split.b, gold + list(split.gold)
        return len(a), float(np.mean(gold)), len(set(zip(a, b, strict=True))), sum(map(len, a + b))

    def theirs(name: str) -> tuple[int, float, int, int]:
        stats = mteb.get_task(name).metadata.descriptive_stats["test"]
        return (stats["num_samples"], stats["label_statistics"]["avg_score"], stats["unique_pairs"],
                stats["number_of_characters"])

    for task, (name, _) in MTEB_TASKS.items():
        n, mean, unique, chars = ours(task)
        n2, mean2, unique2, chars2 = theirs(name)
        assert (n, unique) == (n2, unique2), task
        assert mean == pytest.approx(mean2, abs=1e-9), task
        # SentEval re-joins tokens with single spaces: STS14 loses one trailing space, nothing else differs.
        assert chars2 - chars == (1 if task == "STS14" else 0), task
    n, mean, unique, chars = ours("STSBenchmark")
    n2, mean2, unique2, chars2 = theirs("STSBenchmark")
    assert (n, unique) == (n2, unique2) and mean == pytest.approx(mean2, abs=1e-9)
    assert chars - chars2 > 3000  # SentEval's copy is tokenised ("her hair ."): other input text
    assert ours("SICKRelatedness")[0] == 4927 and theirs("SICK-R")[0] == 9927
