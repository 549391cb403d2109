"""The training core on a tiny random BERT: views, supervised loss, export, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentences
from safetensors.torch import load_file
from test_infonce import naive_infonce

from diffcse.cli import build_parser
from diffcse.cli import main as cli_main
from diffcse.core.errors import InputError
from diffcse.core.modeling import HEADS as MODEL_HEADS
from diffcse.core.modeling import BatchNormProjection, MLPHead, SentenceEncoder
from diffcse.core.options import from_args
from diffcse.training.config import HEADS, TrainConfig, load_config
from diffcse.training.data import (
    ViewCollator,
    read_sentences,
    read_triples,
    tokenize_columns,
)
from diffcse.training.objectives.contrastive import ContrastiveModel
from diffcse.training.objectives.infonce import InfoNCE


def tiny_config(model: str, train_file: Path, out: Path, **kw: object):
    base = dict(
        model=model, train_file=str(train_file), output_dir=str(out), batch_size=8, max_steps=6,
        save_steps=3, logging_steps=2, do_eval=False, precision="fp32", learning_rate=1e-3,
        max_seq_length=16, pooler="cls",
    )
    base.update(kw)
    return load_config(None, base)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "sents.txt"
    path.write_text("\n".join(sentences(64)) + "\n")
    return path


def test_two_views_share_one_forward_and_differ(tiny_bert_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="cls", head="mlp")
    model = ContrastiveModel(enc, InfoNCE()).train()
    calls: list[int] = []
    enc.backbone.register_forward_hook(lambda m, a, k, o: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    ds, _ = tokenize_columns(tok, [sentences(5)], 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(5)])
    out, flat_ids, _, views = model.encode_views(batch["input_ids"], batch["attention_mask"])
    assert calls == [10] and views == 2
    z = out.embedding.view(5, 2, -1)
    assert torch.equal(flat_ids.view(5, 2, -1)[:, 0], flat_ids.view(5, 2, -1)[:, 1])
    assert (z[:, 0] - z[:, 1]).abs().max() > 1e-4  # dropout gives two different views
    model.eval()
    out_eval, _, _, _ = model.encode_views(batch["input_ids"], batch["attention_mask"])
    z = out_eval.embedding.view(5, 2, -1)
    assert torch.allclose(z[:, 0], z[:, 1], atol=1e-6)  # no dropout, same vector


def test_supervised_step_equals_naive(tiny_bert_dir: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    csv = tmp_path / "nli.csv"
    rows = [(a, b, c) for a, b, c in zip(sentences(6, 1), sentences(6, 2), sentences(6, 3), strict=True)]
    csv.write_text("sent0,sent1,hard_neg\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    triples = read_triples(csv)
    assert triples == rows
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooler="cls", head="mlp").eval()
    model = ContrastiveModel(enc, InfoNCE(0.05, hard_negative_weight=0.7))
    ds, _ = tokenize_columns(tok, [list(c) for c in zip(*triples, strict=True)], 16)
    batch = ViewCollator(tok.pad_token_id)([ds[i] for i in range(6)])
    enc.mlp_only_train = False  # eval mode, but keep the head so the loss sees what training sees
    loss = model(**batch)["loss"].item()
    with torch.no_grad():
        zs = []
        for col in range(3):
            one = tok([r[col] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
            zs.append(enc(one["input_ids"], one["attention_mask"]).embedding)
    assert loss == pytest.approx(naive_infonce(*zs, tau=0.05, weight=0.7), rel=1e-4)


def test_supervised_csv_errors_name_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sent0,other\na,b\n")
    with pytest.raises(InputError, match="sent1"):
        read_triples(bad)
    bad.write_text("sent0,sent1,hard_neg\na,b,c\nd,,f\n")
    with pytest.raises(InputError, match=r"bad.csv:3: empty field 'sent1'"):
        read_triples(bad)


def test_export_loads_in_sentence_transformers_and_automodel(tiny_bert_dir: str, corpus: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from diffcse.core.encoder import Encoder
    from diffcse.training.trainer import train

    out = tmp_path / "run"
    summary = train(tiny_config(tiny_bert_dir, corpus, out))
    assert summary["steps"] == 6
    assert (out / "metrics.jsonl").read_text().count("pos_sim") >= 2
    st = SentenceTransformer(str(out), device="cpu")
    pooling = [m for m in st if type(m).__name__ == "Pooling"][0]
    assert pooling.get_config_dict()["pooling_mode"] in ("cls", ["cls"])
    texts = sentences(12, seed=7)
    a = st.encode(texts, convert_to_numpy=True)
    npy = tmp_path / "emb.npy"
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    assert cli_main(["encode", "--model", str(out), "--input", str(tmp_path / "in.txt"), "--output", str(npy)]) == 0
    b = np.load(npy)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.9999
    hf = AutoModel.from_pretrained(str(out)).eval()
    enc = Encoder.load(str(out))
    assert enc.st_model is None and enc.module.pooler == "cls_before_pooler"  # our own code path
    ids = enc.tokenizer(texts[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = hf(**ids).last_hidden_state[:, 0].numpy()
    assert np.allclose(cls, b[:3], atol=1e-5)


def test_resume_gives_same_weights_as_uninterrupted(tiny_bert_dir: str, corpus: Path, tmp_path: Path) -> None:
    from diffcse.training.trainer import train

    full = tmp_path / "full"
    train(tiny_config(tiny_bert_dir, corpus, full))
    # An interrupted run leaves exactly checkpoint-3 behind; resume it to step 6.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full / "checkpoints" / "checkpoint-3", part / "checkpoints" / "checkpoint-3")
    summary = train(tiny_config(tiny_bert_dir, corpus, part, resume=True))
    assert summary["steps"] == 6
    a = load_file(full / "checkpoints" / "checkpoint-6" / "model.safetensors")
    b = load_file(part / "checkpoints" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(full / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # training did move the weights
    # best.json / summary.json are written atomically (no temp files left) and read back as JSON.
    assert json.loads((part / "best.json").read_text()) == {"step": 6, "stsb_dev_spearman": None}
    assert json.loads((part / "summary.json").read_text())["steps"] == 6
    assert not [p.name for p in part.iterdir() if p.name.endswith(".tmp")]


def test_resume_without_checkpoint_is_an_error(tiny_bert_dir: str, corpus: Path, tmp_path: Path) -> None:
    from diffcse.training.trainer import train

    with pytest.raises(ValueError, match="no checkpoint"):
        train(tiny_config(tiny_bert_dir, corpus, tmp_path / "none", resume=True))
    assert not (tmp_path / "none").exists()  # a run that failed before writing leaves no empty folder


def test_input_file_edge_cases(tmp_path: Path, tiny_bert_dir: str) -> None:
    from transformers import AutoTokenizer

    path = tmp_path / "in.txt"
    path.write_bytes(b"first line\r\n\n   \nsecond \xff line\nthird\n")
    with pytest.raises(InputError, match=r"in.txt:4: invalid UTF-8"):
        read_sentences(path)
    sf = read_sentences(path, encoding_errors="replace")
    assert sf.sentences == ["first line", "second \ufffd line", "third"]
    assert (sf.empty_lines, sf.replaced_lines) == (2, 1)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    long = " ".join(["word"] * 50)
    ds, truncated = tokenize_columns(tok, [["a man", long]], 10)
    assert truncated == 1
    ids = ds[1]["views"][0]
    assert len(ids) == 10 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_cli_reports_bad_input_clearly(tiny_bert_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small = tmp_path / "small.txt"
    small.write_text("one sentence\ntwo sentences\n")
    code = cli_main(["train", "--model", tiny_bert_dir, "--train-file", str(small), "--output-dir", str(tmp_path / "o"), "--no-do-eval"])
    assert code == 2
    assert "fewer than one batch" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xc3\x28\n")
    code = cli_main(["train", "--model", tiny_bert_dir, "--train-file", str(bad), "--output-dir", str(tmp_path / "o"), "--no-do-eval"])
    assert code == 2 and "bad.txt:2" in capsys.readouterr().err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("batch_sise: 3\n")
    assert cli_main(["train", "--config", str(yaml_file)]) == 2
    assert "batch_sise" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_yaml_config_and_cli_override(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("batch_size: 16\nlearning_rate: 1.0e-4\nobjective: simcse\n")
    config = load_config(yaml_file, {"batch_size": 4, "learning_rate": None})
    assert (config.batch_size, config.learning_rate) == (4, 1e-4)
    with pytest.raises(ValueError, match="objective"):
        load_config(None, {"objective": "nope"})


def test_python_m_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "diffcse", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--objective" in out.stdout and "--lambda-weight" in out.stdout


def test_head_default_follows_objective(tmp_path: Path) -> None:
    assert TrainConfig().head == "auto"
    assert set(HEADS) - {"auto"} == set(MODEL_HEADS)  # config's choices track modeling's heads
    expected = {"simcse": "mlp", "sup-simcse": "mlp", "diffcse": "batchnorm"}
    for objective, head in expected.items():
        config = load_config(None, {"objective": objective, "train_file": "x.csv", "generator": "random"})
        assert config.head == head, objective
        config.validate()  # idempotent once resolved
        assert config.head == head, objective
    # An explicit head always wins, whatever the objective.
    for head in ("none", "mlp", "batchnorm"):
        assert load_config(None, {"objective": "diffcse", "head": head, "generator": "random"}).head == head
        assert load_config(None, {"objective": "simcse", "head": head}).head == head
    # The YAML written for the run (and read back by --resume) holds the resolved head.
    load_config(None, {"objective": "diffcse", "generator": "random"}).save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").head == "batchnorm"
    (tmp_path / "d.yaml").write_text("objective: diffcse\nhead: mlp\ngenerator: random\n")
    assert load_config(tmp_path / "d.yaml").head == "mlp"
    with pytest.raises(ValueError, match="head"):
        load_config(None, {"head": "bn"})


def test_cli_head_default_and_override() -> None:
    def head_of(*argv: str) -> str:
        args = build_parser().parse_args(["train", "--generator", "random", *argv])
        return from_args(TrainConfig, args).head

    assert head_of("--objective", "diffcse") == "batchnorm"
    assert head_of("--objective", "diffcse", "--head", "mlp") == "mlp"
    assert head_of("--objective", "simcse") == "mlp"
    assert head_of() == "mlp"
    assert head_of("--objective", "simcse", "--head", "auto") == "mlp"
    with pytest.raises(SystemExit):
        head_of("--head", "bn")


def test_diffcse_builds_batchnorm_head_by_default(tiny_bert_dir: str) -> None:
    from transformers import AutoTokenizer

    from diffcse.training.trainer import build_model

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    base = {"model": tiny_bert_dir, "pooler": "cls", "generator": "random", "discriminator_layers": 1}
    model = build_model(load_config(None, {**base, "objective": "diffcse"}), tiny_bert_dir, tok)
    assert isinstance(model.encoder.head, BatchNormProjection)
    model = build_model(load_config(None, {**base, "objective": "diffcse", "head": "mlp"}), tiny_bert_dir, tok)
    assert isinstance(model.encoder.head, MLPHead)
    model = build_model(load_config(None, {**base, "objective": "simcse"}), tiny_bert_dir, tok)
    assert isinstance(model.encoder.head, MLPHead)


def test_dev_set_scores_alignment_uniformity_and_user_dev_file(
    tiny_bert_dir: str, corpus: Path, tmp_path: Path, data_dir: Path
) -> None:
    """STS-B dev logs alignment/uniformity (equal to a recomputation on the export); --dev-file selects the best."""
    from diffcse.core.encoder import Encoder
    from diffcse.core.metrics import alignment, uniformity
    from diffcse.training.trainer import train
    from senteval_runner.sts import StsbDevEvaluator

    out = tmp_path / "stsb"
    summary = train(tiny_config(tiny_bert_dir, corpus, out, do_eval=True, eval_steps=2, max_steps=4,
                                senteval_data=str(data_dir / "senteval")))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logs if "eval_stsb_spearman" in r]
    assert evals and all("eval_alignment" in r and "eval_uniformity" in r for r in evals)
    best = json.loads((out / "best.json").read_text())
    at_best = next(r for r in evals if r["step"] == best["step"])
    dev = StsbDevEvaluator(data_dir / "senteval")
    emb = Encoder.load(str(out), device="cpu").encode(dev.sentences)
    index = {s: i for i, s in enumerate(dev.sentences)}
    keep = dev.pairs.gold > 4
    a = emb[[index[s] for s, k in zip(dev.pairs.a, keep, strict=True) if k]]
    b = emb[[index[s] for s, k in zip(dev.pairs.b, keep, strict=True) if k]]
    assert at_best["eval_alignment"] == pytest.approx(alignment(a, b), rel=1e-4)
    assert at_best["eval_uniformity"] == pytest.approx(uniformity(emb), rel=1e-4)
    assert summary["dev_metric"] == "stsb_dev_spearman" and summary["stsb_dev_spearman_best"] == best["stsb_dev_spearman"]

    dev_file = tmp_path / "my-dev.tsv"
    texts = sentences(30, seed=9)
    dev_file.write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{texts[i]}\t{texts[i + 1]}\t{(i * 7) % 5}\n" for i in range(0, 28)))
    out2 = tmp_path / "mine"
    summary = train(tiny_config(tiny_bert_dir, corpus, out2, do_eval=True, eval_steps=2, max_steps=4,
                                dev_file=str(dev_file)))
    logs = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["eval_dev_file_spearman"] for r in logs if "eval_dev_file_spearman" in r}
    best = json.loads((out2 / "best.json").read_text())
    assert summary["dev_metric"] == "dev_file_spearman"
    assert best["dev_file_spearman"] == max(scores.values()) == summary["dev_file_spearman_best"]
    assert not any("eval_stsb_spearman" in r for r in logs)
