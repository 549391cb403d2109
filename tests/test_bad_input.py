"""Every bad input a user can give the command line: one line naming the file, line or option; no traceback.

The same cases make docs/bad-input.md, so the table cannot drift from what the commands say:
`DIFFCSE_WRITE_DOCS=1 pytest tests/test_bad_input.py` rewrites it, and this test fails while the
committed table differs from the messages the commands print.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import sentences

from diffcse.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-input.md"


@dataclass
class Case:
    """One bad input: what it is, the command, the text the message must hold, the exit code."""

    input: str
    argv: list[str]
    expect: str
    code: int = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: str) -> dict[str, Path]:
    """Files the cases point at: good and broken corpora, configs, model folders, an index, an export."""
    t = tmp_path_factory.mktemp("bad")
    (t / "corpus.txt").write_text("\n".join(sentences(40, seed=1)) + "\n")
    (t / "few.txt").write_text("one sentence\ntwo sentences\n")
    (t / "latin1.txt").write_bytes(b"good line\nanother\nbad \xe9 byte\n")
    (t / "bad.yaml").write_text("batch_size: 8\nlearning_rate: [1e-3\n")
    (t / "unknown.yaml").write_text("batch_sise: 8\n")
    (t / "wrongtype.yaml").write_text("batch_size: eight\n")
    (t / "nocol.csv").write_text("sent0,hard_neg\na,b\n")
    (t / "empty_field.csv").write_text("sent0,sent1,hard_neg\na,b,c\nd,,f\n")
    (t / "a-file").write_text("not a folder\n")
    (t / "not-a-model").mkdir()
    (t / "not-a-model" / "readme.txt").write_text("notes\n")
    no_tok = t / "no-tokenizer"
    no_tok.mkdir()
    shutil.copy(Path(tiny_bert_dir) / "config.json", no_tok / "config.json")
    shutil.copy(Path(tiny_bert_dir) / "model.safetensors", no_tok / "model.safetensors")
    (t / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (t / "dev.tsv").write_text("sentence1\tsentence2\tscore\na man\ta dog\t1\nthe cat\ta car\tlots\n")
    (t / "pairs.csv").write_text("sent0,positive\na man,a dog\n")
    export = t / "export"
    assert cli_main(["train", "--model", tiny_bert_dir, "--train-file", str(t / "corpus.txt"), "--output-dir",
                     str(export), "--batch-size", "8", "--max-steps", "1", "--no-do-eval", "--precision", "fp32",
                     "--pooler", "cls", "--max-seq-length", "16"]) == 0
    index = t / "index"
    assert cli_main(["index", "build", "--model", tiny_bert_dir, "--input", str(t / "corpus.txt"),
                     "--index-dir", str(index)]) == 0
    return {"t": t, "model": Path(tiny_bert_dir), "export": export, "index": index}


def cases(w: dict[str, Path]) -> list[Case]:
    t, model = w["t"], str(w["model"])
    train = ["train", "--model", model, "--train-file", str(t / "corpus.txt"), "--output-dir", str(t / "out"),
             "--batch-size", "8", "--max-steps", "2", "--no-do-eval", "--precision", "fp32", "--pooler", "cls",
             "--max-seq-length", "16"]

    def with_(argv: list[str], **changes: str) -> list[str]:
        out = list(argv)
        for flag, value in changes.items():
            flag = "--" + flag.replace("_", "-")
            if flag in out:
                out[out.index(flag) + 1] = value
            else:
                out += [flag, value]
        return out

    return [
        Case("a Hub name instead of a folder (nothing is downloaded)", with_(train, model="bert-base-uncased"),
             "'bert-base-uncased' is not a folder on this machine"),
        Case("a folder that is not a model", with_(train, model=str(t / "not-a-model")),
             "not a model folder: it has no config.json"),
        Case("a model folder without tokenizer files", with_(train, model=str(t / "no-tokenizer")),
             "no usable tokenizer in the folder"),
        Case("malformed YAML config", ["train", "--config", str(t / "bad.yaml")], "bad.yaml:3: malformed YAML"),
        Case("unknown YAML field", ["train", "--config", str(t / "unknown.yaml")], "unknown field(s) batch_sise"),
        Case("YAML value of the wrong type", ["train", "--config", str(t / "wrongtype.yaml")],
             "field 'batch_size': expected int, got 'eight'"),
        Case("batch size 0", with_(train, batch_size="0"), "argument --batch-size: must be >= 1, got 0"),
        Case("a bool option given a value", [*train, "--packing", "false"], "unrecognized arguments: false"),
        Case("max length beyond the model's positions", with_(train, max_seq_length="1000"),
             "--max-seq-length 1000 exceeds the 64 positions"),
        Case("training file missing", with_(train, train_file=str(t / "missing.txt")),
             "training file " + str(t / "missing.txt") + " does not exist"),
        Case("training file is a folder", with_(train, train_file=str(t)), "is a folder, not a file"),
        Case("invalid UTF-8 in the training file", with_(train, train_file=str(t / "latin1.txt")),
             "latin1.txt:3: invalid UTF-8 at byte 4"),
        Case("fewer sentences than one batch", with_(train, train_file=str(t / "few.txt")),
             "2 usable examples, fewer than one batch (8)"),
        Case("supervised CSV without a needed column",
             with_(train, objective="sup-simcse", train_file=str(t / "nocol.csv")), "lacks the column 'sent1'"),
        Case("supervised CSV with an empty field",
             with_(train, objective="sup-simcse", train_file=str(t / "empty_field.csv")),
             "empty_field.csv:3: empty field 'sent1'"),
        Case("fp16 without a GPU", with_(train, precision="fp16"), "fp16 needs a CUDA GPU"),
        Case("--resume with no checkpoint", [*with_(train, output_dir=str(t / "fresh")), "--resume"],
             "--resume: no checkpoint under"),
        Case("DiffCSE without a generator", with_(train, objective="diffcse"), "generator: DiffCSE needs one"),
        Case("an MLM generator that is not a folder", with_(train, objective="diffcse", generator="mlm:nope"),
             "generator 'nope' is not a folder on this machine"),
        Case("--output-dir is a file", with_(train, output_dir=str(t / "a-file")), "is a file, not a folder"),
        Case("a dev file with a bad score", [*with_(train, dev_file=str(t / "dev.tsv")), "--do-eval"],
             "dev.tsv:3: score is not a finite number: 'lots'"),
        Case("gradient caching with the masked-LM objective", with_(train, objective="mlm", grad_cache_chunk="4"),
             "grad_cache_chunk: gradient caching applies to simcse, sup-simcse and diffcse"),
        Case("uscal: a zero perturbation", with_(train, objective="uscal", adv_epsilon="0"),
             "argument --adv-epsilon: must be >= 1e-12, got 0"),
        Case("a run whose loss diverges (exit 1)", with_(train, learning_rate="1e30", max_steps="20",
                                                         output_dir=str(t / "diverged")),
             "training diverged at step", code=1),
        Case("encode: input missing", ["encode", "--model", model, "--input", str(t / "nope.txt"), "--output",
                                       str(t / "e.npy")], "input file " + str(t / "nope.txt") + " does not exist"),
        Case("encode: output is a folder", ["encode", "--model", model, "--input", str(t / "corpus.txt"),
                                            "--output", str(t)], "is a folder; name the .npy file to write"),
        Case("encode: max length below 3", ["encode", "--model", model, "--input", str(t / "corpus.txt"),
                                            "--output", str(t / "e.npy"), "--max-seq-length", "2"],
             "argument --max-seq-length: must be >= 3, got 2"),
        Case("encode: --backend onnx with a pooler that needs every layer",
             ["encode", "--model", model, "--input", str(t / "corpus.txt"), "--output", str(t / "e.npy"),
              "--backend", "onnx", "--pooler", "avg_top2"], "--backend onnx: pooler 'avg_top2' needs every layer's states"),
        Case("eval: SentEval data folder missing", ["eval", "--model", model, "--senteval-data", str(t / "nodata")],
             str(t / "nodata")),
        Case("eval: --pooler cls on a model trained with mlp_only_train",
             ["eval", "--model", str(w["export"]), "--pooler", "cls"], "Use --pooler cls_before_pooler"),
        Case("eval: unknown task", ["eval", "--model", model, "--tasks", "STS99"], "--tasks: unknown task(s) STS99"),
        Case("index: --index-dir is a file", ["index", "build", "--model", model, "--input", str(t / "corpus.txt"),
                                               "--index-dir", str(t / "a-file")], "is a file, not an index directory"),
        Case("index: building over an existing index", ["index", "build", "--model", model, "--input",
                                                         str(t / "corpus.txt"), "--index-dir", str(w["index"])],
             "already holds an index: pass --overwrite"),
        Case("index: a parameter of another index kind", ["index", "build", "--model", model, "--input",
                                                           str(t / "corpus.txt"), "--index-dir", str(t / "i2"),
                                                           "--nlist", "4"],
             "--nlist: not a parameter of index kind 'flat'"),
        Case("index: a broken JSON line", ["index", "build", "--model", model, "--input", str(t / "bad.jsonl"),
                                            "--index-dir", str(t / "i3")], "bad.jsonl:2: not valid JSON"),
        Case("search: no such index", ["search", "--index-dir", str(t / "noindex"), "--query", "a"], "does not exist"),
        Case("search: a filter with an unknown operator", ["search", "--index-dir", str(w["index"]), "--query", "a",
                                                           "--where", '{"year": {"around": 2000}}'], "around"),
        Case("mine: a pair file without sent1", ["mine", "--model", model, "--pairs", str(t / "pairs.csv"),
                                                 "--corpus", str(t / "corpus.txt"), "--output", str(t / "m.csv")],
             "lacks the column 'sent1'"),
        Case("serve: port out of range", ["serve", "--index-dir", str(w["index"]), "--port", "99999"],
             "argument --port: must be <= 65535, got 99999"),
        Case("finetune: unknown task", ["finetune", "--task", "SICK"], "unknown task 'SICK'"),
        Case("finetune: unknown loss term", ["finetune", "--loss", "cce+arcface"], "unknown term 'arcface'"),
        Case("finetune: malformed loss weight", ["finetune", "--loss-weight", "cce"], "expected TERM=NUMBER"),
        Case("finetune: a non-positive SCAL perturbation", ["finetune", "--loss", "cce+scal", "--loss-param",
                                                             "scal.epsilon=0"], "epsilon"),
    ]


def run_case(case: Case, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli_main(case.argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("diffcse")]
    assert lines, f"no error line for {case.input}: {err!r}"
    return code, lines[-1]


def table(rows: list[tuple[Case, str]], w: dict[str, Path]) -> str:
    def clean(text: str) -> str:
        return text.replace(str(w["model"]), "MODEL").replace(str(w["t"]), "DIR").replace("|", "\\|")

    out = [
        "# Bad input: what each command says",
        "",
        "Generated by `tests/test_bad_input.py`, which runs every case (`DIFFCSE_WRITE_DOCS=1` rewrites this",
        "file; the test fails while it differs). `MODEL` is a model folder, `DIR` a scratch folder. Exit code 2",
        "is bad input, 1 a run that could not finish; no case prints a traceback.",
        "",
        "| input | command | exit | message |",
        "|---|---|---|---|",
    ]
    for case, message in rows:
        command = "diffcse " + " ".join(a if " " not in a else repr(a) for a in case.argv)
        out.append(f"| {case.input} | `{clean(command)}` | {case.code} | {clean(message)} |")
    return "\n".join(out) + "\n"


def test_every_bad_input_is_one_clear_line(world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rows = []
    for case in cases(world):
        code, message = run_case(case, capsys)
        assert code == case.code, (case.input, message)
        assert case.expect in message, (case.input, message)
        rows.append((case, message))
    text = table(rows, world)
    if os.environ.get("DIFFCSE_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/bad-input.md is stale: rerun with DIFFCSE_WRITE_DOCS=1"
    # None of the failed runs left a half-written file or an empty output folder behind.
    t = world["t"]
    assert not (t / "e.npy").exists() and not any(p.name.startswith(".e.npy") for p in t.iterdir())
    assert not (t / "out").exists()  # every failed training run above left no empty output folder
    summary = json.loads((t / "diverged" / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["status"] == "diverged"
