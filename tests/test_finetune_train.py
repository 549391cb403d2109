"""Fine-tuning on a tiny random BERT: loss values vs pytorch-metric-learning, descent, frozen-layer cache,
and `diffcse finetune` end to end on small SentEval-format task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS
from pytorch_metric_learning import losses as pml

from diffcse.cli import main
from diffcse.finetune import (
    FinetuneConfig,
    FineTuneModel,
    Finetuner,
    load_fewshot_task,
    make_episode,
    parse_loss_spec,
)
from diffcse.finetune.losses import CombinedLoss
from diffcse.finetune.model import Featurizer

POS = ["good", "great", "love", "fun", "happy"]
NEG = ["bad", "terrible", "hate", "boring", "sad"]
FILLER = [w for w in WORDS if w not in POS + NEG]


def sentence(rng: random.Random, cue: list[str]) -> str:
    """Filler words with two cue words of one class mixed in."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))] + rng.sample(cue, 2)
    rng.shuffle(words)
    return " ".join(words)


def write_tree(root: Path, n: int = 40, seed: int = 0) -> Path:
    """A small SentEval downstream/ tree with MR, TREC and MRPC files in SentEval's formats."""
    rng = random.Random(seed)
    ds = root / "downstream"
    (ds / "MR").mkdir(parents=True)
    (ds / "MR" / "rt-polarity.pos").write_bytes("\n".join(sentence(rng, POS) for _ in range(n)).encode("latin-1"))
    (ds / "MR" / "rt-polarity.neg").write_bytes("\n".join(sentence(rng, NEG) for _ in range(n)).encode("latin-1"))
    (ds / "TREC").mkdir()
    coarse = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    for name, count in (("train_5500.label", 6), ("TREC_10.label", 3)):
        # ABBR gets only 3 training questions, so --shots 4 must fail naming it.
        lines = [f"{c}:fine {sentence(rng, [c.lower(), 'x' + c.lower()])}" for c in coarse
                 for _ in range(3 if c == "ABBR" and count == 6 else count)]
        (ds / "TREC" / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    (ds / "MRPC").mkdir()
    for split in ("train", "test"):
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n // 2):
            a = sentence(rng, POS)
            same = i % 2
            b = " ".join(reversed(a.split())) if same else sentence(rng, NEG)
            rows.append(f"{same}\t{i}\t{i + 1000}\t{a}\t{b}")
        (ds / "MRPC" / f"msr_paraphrase_{split}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small SentEval tree, written once for this module."""
    return write_tree(tmp_path_factory.mktemp("senteval"))


@pytest.fixture(scope="module")
def tuner(tiny_bert_dir: str) -> Finetuner:
    """A Finetuner over the tiny BERT, fine-tuning all layers."""
    return Finetuner(tiny_bert_dir, "avg", max_seq_length=32, device="cpu")


def test_frozen_layer_cache_gives_the_same_vectors_as_the_full_model(tiny_bert_dir: str) -> None:
    tuner = Finetuner(tiny_bert_dir, "avg", max_seq_length=32, train_layers=1, device="cpu")
    full = Featurizer(tuner.pristine, tuner.tokenizer, 32, None)
    texts = ["a man plays the guitar", "the dog runs fast in the park today", "she reads"]
    with torch.no_grad():
        cached = tuner.base.embed(tuner.base.prepare(texts), [0, 1, 2])
        direct = full.embed(full.prepare(texts), [0, 1, 2])
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in tuner.pristine.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("backbone.encoder.layer.1.") for n in trainable)
    with pytest.raises(ValueError, match="train_layers: must be in 0..2"):
        Finetuner(tiny_bert_dir, "avg", train_layers=3, device="cpu")


@pytest.mark.parametrize("spec_text", ["cce+proxyanchor", "tripleentropy", "cce+supcon", "proxynca", "tripletmargin"])
def test_loss_on_tiny_model_features_matches_pytorch_metric_learning(tuner: Finetuner, tree: Path, spec_text: str) -> None:
    loaded = load_fewshot_task("MR", tree / "downstream")
    ep = make_episode(loaded, 6, seed=0)
    spec = parse_loss_spec(spec_text)
    feat = tuner.fresh()
    model = FineTuneModel(feat, 2, pair=False)
    loss = CombinedLoss(spec, 2, model.feature_dim)
    a, _ = tuner.prepare(feat, ep.train)
    idx = np.arange(len(ep.train))
    y = torch.as_tensor(ep.train.y)
    features = model.features(a, idx)
    logits = model.head(features if spec.has_cce else features.detach())
    out = loss(logits, features, y)
    expected = 0.0
    for term, w in spec.weights.items():
        if term == "cce":
            value = float(F.cross_entropy(logits, y).detach())
        else:
            cls = {"proxyanchor": pml.ProxyAnchorLoss, "softtriple": pml.SoftTripleLoss, "supcon": pml.SupConLoss,
                   "proxynca": pml.ProxyNCALoss, "tripletmargin": pml.TripletMarginLoss}[term]
            kwargs = spec.params.get(term, {})
            ref = cls(num_classes=2, embedding_size=32, **kwargs) if hasattr(loss.dml[term], "num_classes") else cls(**kwargs)
            ref.load_state_dict(loss.dml[term].state_dict())
            value = float(ref(features, y).detach())
        assert out.parts[term] == pytest.approx(value, rel=1e-5, abs=1e-6)
        expected += w * value
    if not spec.has_cce:
        expected += float(F.cross_entropy(logits, y).detach())
    assert float(out.total.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spec_text", ["cce", "cce+proxyanchor", "cce+softtriple", "tripleentropy", "cce+supcon", "proxyanchor", "softtriple"])
def test_training_loss_decreases_on_the_tiny_model(tuner: Finetuner, tree: Path, spec_text: str) -> None:
    loaded = load_fewshot_task("MR", tree / "downstream")
    ep = make_episode(loaded, 8, seed=1, max_test=10)
    cfg = FinetuneConfig(loss=spec_text, max_steps=25, batch_size=16, lr=1e-3, head_lr=1e-2, proxy_lr=1e-1)
    res = tuner.run(ep, cfg)
    first, last = np.mean(res.loss_history[:3]), np.mean(res.loss_history[-3:])
    assert last < 0.8 * first, res.loss_history
    assert res.steps == 25 and res.n_train == 16 and res.n_test == 10
    assert 0.0 <= res.accuracy_classifier <= 1.0
    assert (res.accuracy_proxy is not None) == any(t in spec_text for t in ("proxy", "softtriple", "tripleentropy"))


def test_runs_are_reproducible_and_share_the_head_init(tuner: Finetuner, tree: Path) -> None:
    loaded = load_fewshot_task("MR", tree / "downstream")
    ep = make_episode(loaded, 4, seed=2, max_test=20)
    cfg = FinetuneConfig(loss="cce+proxyanchor", max_steps=4)
    r1 = tuner.run(ep, cfg)
    r2 = tuner.run(ep, cfg)
    assert r1.loss_history == r2.loss_history and r1.accuracy == r2.accuracy
    # The CCE term at step 0 depends only on the head init and data, so it is the same for every loss.
    r3 = tuner.run(ep, FinetuneConfig(loss="cce", max_steps=1))
    assert r3.loss_first["cce"] == pytest.approx(r1.loss_first["cce"], rel=1e-6)


def test_cli_finetune_end_to_end_with_proxy_inference_and_export(tiny_bert_dir: str, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "fs"
    rc = main([
        "finetune", "--model", tiny_bert_dir, "--task", "mr", "--shots", "4", "--loss", "cce+proxyanchor",
        "--loss-weight", "proxyanchor=0.5", "--loss-param", "proxyanchor.margin=0.2", "--seeds", "2",
        "--output-dir", str(out), "--inference", "proxy", "--senteval-data", str(tree), "--max-steps", "3",
        "--export", "--threads", "1", "--device", "cpu",
    ])
    assert rc == 0
    res = json.loads((out / "MR-4shot-cce_proxyanchor-proxy" / "results.json").read_text())
    assert res["loss_weights"] == {"cce": 1.0, "proxyanchor": 0.5}
    assert res["loss_params"] == {"proxyanchor": {"margin": 0.2}}
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    assert all(r["accuracy"] == r["accuracy_proxy"] for r in res["runs"])
    accs = 100 * np.array([r["accuracy"] for r in res["runs"]])
    assert res["accuracy"]["mean"] == pytest.approx(accs.mean())
    assert res["accuracy"]["std"] == pytest.approx(accs.std(ddof=1))
    assert "held-out 0.2" in res["protocol"]
    # The exported encoder loads like any other model and differs from the one it started from.
    from diffcse.core.encoder import Encoder

    model_dir = out / "MR-4shot-cce_proxyanchor-proxy" / "seed0" / "model"
    assert (model_dir / "finetune_head.safetensors").exists()
    texts = ["a good fun movie", "the bad sad day"]
    tuned = Encoder.load(str(model_dir), device="cpu").encode(texts)
    base = Encoder.load(tiny_bert_dir, pooler="avg", device="cpu").encode(texts)
    assert tuned.shape == base.shape and not np.allclose(tuned, base)


def test_cli_finetune_pair_task_and_all_shots(tiny_bert_dir: str, tree: Path, tmp_path: Path) -> None:
    rc = main([
        "finetune", "--model", tiny_bert_dir, "--task", "MRPC", "--shots", "all", "--loss", "tripleentropy",
        "--seeds", "1", "--output-dir", str(tmp_path), "--senteval-data", str(tree), "--max-steps", "2",
        "--train-layers", "1", "--device", "cpu",
    ])
    assert rc == 0
    res = json.loads((tmp_path / "MRPC-allshot-tripleentropy-classifier" / "results.json").read_text())
    run = res["runs"][0]
    assert run["n_train"] == 20 and run["n_test"] == 20 and res["protocol"] == "official train/test split"
    assert run["accuracy_proxy"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "TREC", "--shots", "4"], "shots: 4 per class is more than class 0 has (3) in TREC training pool"),
        (["--task", "MR", "--loss", "cce+arcface"], "unknown term 'arcface'"),
        (["--task", "MR", "--loss", "cce+supcon", "--inference", "proxy"], "inference: 'proxy' needs a proxy loss"),
        (["--task", "MR", "--loss-weight", "cce"], "--loss-weight: expected TERM=NUMBER"),
        (["--task", "MR", "--loss", "cce+softtriple", "--loss-param", "softtriple.temperature=1"], "softtriple has no argument temperature"),
    ],
)
def test_cli_errors_are_one_clear_line(
    tiny_bert_dir: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    rc = main(["finetune", "--model", tiny_bert_dir, "--senteval-data", str(tree), "--output-dir", str(tmp_path),
               "--max-steps", "1", "--seeds", "1", "--device", "cpu", *args])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and last.startswith("diffcse finetune: error:")


def test_cli_rejects_unknown_task(capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--task", "SICK"]) == 2
    assert "unknown task 'SICK'; choose from MR, CR" in capsys.readouterr().err
