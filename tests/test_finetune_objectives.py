"""The objectives family (scal, clld, moscl + EPO, ensemble, jcc) against naive computations.

Gradients are compared in float64 on the tiny random BERT (eval mode: no dropout, so the two
computations see the same network); the naive versions are written loop by loop from the
definitions in docs/finetune.md, not from our vectorised code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from test_finetune_train import write_tree

from diffcse.cli import main
from diffcse.finetune import (
    FinetuneConfig,
    FineTuneModel,
    Finetuner,
    load_fewshot_task,
    make_episode,
    parse_loss_spec,
    predict_nearest_proxy,
    scl_front,
)
from diffcse.finetune.losses import CombinedLoss, LossContext
from diffcse.finetune.objectives.clld import load_label_distances
from diffcse.finetune.objectives.epo import epo_weights, trace_front
from diffcse.finetune.objectives.moscl import scl_pull_push
from diffcse.finetune.objectives.scal import adversarial_perturbation

TEXTS = ["a good fun movie", "the bad sad day was boring", "great story", "i hate this terrible film today",
         "happy people love music", "boring old news"]
LABELS = torch.tensor([0, 1, 0, 1, 0, 1])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SentEval tree (MR, TREC, MRPC)."""
    return write_tree(tmp_path_factory.mktemp("senteval_obj"), n=24)


@pytest.fixture(scope="module")
def tuner(tiny_bert_dir: str) -> Finetuner:
    """All layers trainable."""
    return Finetuner(tiny_bert_dir, "avg", max_seq_length=32, device="cpu")


@pytest.fixture(scope="module")
def tuner_top(tiny_bert_dir: str) -> Finetuner:
    """Only the top layer trainable; the bottom is cached."""
    return Finetuner(tiny_bert_dir, "avg", max_seq_length=32, train_layers=1, device="cpu")


def float64_model(tuner: Finetuner, classes: int = 2) -> FineTuneModel:
    """A fresh float64 model in eval mode (no dropout: two computations see the same function)."""
    feat = tuner.fresh()
    torch.manual_seed(0)
    model = FineTuneModel(feat, classes, pair=False).double()
    model.eval()
    return model


def handmade(n_per_class: int = 4, classes: int = 3, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 features with requires_grad, in noisy class clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return x.requires_grad_(True), labels


def num(t: torch.Tensor) -> float:
    """A scalar tensor's value (detached first: no autograd warning)."""
    return float(t.detach())


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two vectors, written out."""
    return (a * b).sum() / (a.norm() * b.norm())


# ---------------------------------------------------------------- SCAL

def scal_context(model: FineTuneModel, texts: list[str]) -> tuple[torch.Tensor, LossContext]:
    """Clean features and the loss context, built the way the training loop builds them."""
    prepared = model.featurizer.prepare(texts)
    inputs = model.inputs(prepared, list(range(len(texts))))
    features = model.features_from(inputs)
    ctx = LossContext(head=model.head, inputs=[i.embeds for i in inputs], masks=[i.mask for i in inputs],
                      encode=lambda xs: model.features_from(inputs, xs), input_kind=inputs[0].kind)
    return features, ctx


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("steps", [1, 3])
def test_perturbation_has_the_configured_norm_per_example(tuner: Finetuner, norm: str, steps: int) -> None:
    model = float64_model(tuner)
    features, ctx = scal_context(model, TEXTS)
    eps = 0.3
    ce = F.cross_entropy(model.head(features), LABELS)
    (delta,) = adversarial_perturbation(ctx.inputs, ctx.masks, ce, lambda xs: F.cross_entropy(model.head(ctx.encode(xs)), LABELS),
                                        eps, steps=steps, norm=norm)
    mask = ctx.masks[0].bool()
    assert delta.shape == ctx.inputs[0].shape and (~mask).any()  # the batch has padding
    assert torch.all(delta[~mask] == 0), "padding positions must stay unperturbed"
    for b in range(len(TEXTS)):
        d = delta[b][mask[b]]
        size = float(d.norm()) if norm == "l2" else float(d.abs().max())
        if steps == 1:
            assert size == pytest.approx(eps, rel=1e-9)  # FGSM: exactly on the sphere / the cube's faces
            if norm == "linf":
                assert torch.allclose(d.abs()[d != 0], torch.full_like(d.abs()[d != 0], eps))
        else:
            assert 0.1 * eps < size <= eps * (1 + 1e-9)  # PGD stays in the ball


def naive_scal_total(model: FineTuneModel, texts: list[str], labels: torch.Tensor, eps: float, steps: int,
                     norm: str, tau: float) -> torch.Tensor:
    """CE + InfoNCE(perturbed → clean), every step written out per example from the definitions."""
    feat = model.featurizer
    if feat.top is None:
        enc = feat.tokenizer(texts, padding=True, return_tensors="pt")
        mask = enc["attention_mask"]
        x = feat.encoder.backbone.embeddings.word_embeddings(enc["input_ids"])

        def run(e: torch.Tensor) -> torch.Tensor:
            return feat.encoder.backbone(inputs_embeds=e, attention_mask=mask, token_type_ids=enc["token_type_ids"]).last_hidden_state
    else:
        seqs = [feat._cache[t] for t in texts]
        width = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), width, seqs[0].shape[1], dtype=torch.float64)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = s.double()
            mask[i, : len(s)] = 1
        x.requires_grad_(True)

        def run(e: torch.Tensor) -> torch.Tensor:
            return feat.top(inputs_embeds=e, attention_mask=mask).last_hidden_state

    def encode(e: torch.Tensor) -> torch.Tensor:
        h = run(e)
        m = mask.unsqueeze(-1).double()
        return (h * m).sum(1) / m.sum(1)

    def step(grad: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(grad)
        for b in range(len(texts)):
            g = grad[b] * mask[b].unsqueeze(-1)
            out[b] = g / g.norm() if norm == "l2" else g.sign()
        return out

    def proj(d: torch.Tensor) -> torch.Tensor:
        out = d.clone()
        for b in range(len(texts)):
            if norm == "l2":
                n = d[b].norm()
                if n > eps:
                    out[b] = d[b] * (eps / n)
            else:
                out[b] = d[b].clamp(-eps, eps)
        return out

    alpha = min(eps, 2.5 * eps / steps)
    clean = encode(x)
    ce = F.cross_entropy(model.head(clean), labels)
    (g,) = torch.autograd.grad(ce, x, retain_graph=True)
    d = proj(alpha * step(g))
    for _ in range(steps - 1):
        d = d.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model.head(encode(x.detach() + d)), labels), d)
        d = proj(d + alpha * step(g))
    adv = encode(x + d.detach())
    info = 0.0
    for i in range(len(texts)):
        num = torch.exp(cos(adv[i], clean[i]) / tau)
        den = sum(torch.exp(cos(adv[i], clean[j]) / tau) for j in range(len(texts)))
        info = info - torch.log(num / den)
    return ce + info / len(texts)


@pytest.mark.parametrize(("partial", "steps", "norm"), [(False, 2, "l2"), (True, 2, "linf"), (False, 1, "linf")])
def test_scal_equals_the_naive_step_by_step_computation(
    tuner: Finetuner, tuner_top: Finetuner, partial: bool, steps: int, norm: str
) -> None:
    model = float64_model(tuner_top if partial else tuner)
    eps, tau = 0.5 if norm == "l2" else 0.02, 0.2
    spec = parse_loss_spec("cce+scal", params={"scal": {"epsilon": eps, "steps": steps, "norm": norm, "temperature": tau}})
    loss = CombinedLoss(spec, 2, model.feature_dim).double()
    params = [p for p in model.parameters() if p.requires_grad]
    features, ctx = scal_context(model, TEXTS)
    assert ctx.input_kind == ("cached hidden states" if partial else "word embeddings")
    ours = loss(model.head(features), features, LABELS, ctx).total
    # allow_unused: the backbone's pooler layer is trainable but mean pooling never reads it.
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    naive = naive_scal_total(model, TEXTS, LABELS, eps, steps, norm, tau)
    g_naive = torch.autograd.grad(naive, params, allow_unused=True)
    assert num(ours) == pytest.approx(num(naive), rel=1e-10)
    used = 0
    for a, b in zip(g_ours, g_naive, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
            used += 1
    assert used >= 16 if not partial else used >= 8  # the encoder's layers all get gradients


def test_scal_clean_features_through_inputs_equal_the_usual_path(tuner: Finetuner) -> None:
    model = float64_model(tuner)
    prepared = model.featurizer.prepare(TEXTS)
    idx = list(range(len(TEXTS)))
    with torch.no_grad():
        torch.testing.assert_close(model.features_from(model.inputs(prepared, idx)), model.features(prepared, idx))


# ---------------------------------------------------------------- CLLD

def naive_clld(x: torch.Tensor, y: torch.Tensor, omega: torch.Tensor, tau: float) -> torch.Tensor:
    """Weighted supervised contrastive loss by a double loop over anchors and positives."""
    terms = []
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        den = sum((1.0 if y[a] == y[i] else omega[y[i], y[a]]) * torch.exp(cos(x[i], x[a]) / tau)
                  for a in range(len(y)) if a != i)
        terms.append(sum(-torch.log(torch.exp(cos(x[i], x[p]) / tau) / den) for p in pos) / len(pos))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("source", ["learned", "csv", "json"])
def test_clld_equals_the_naive_double_loop(tmp_path: Path, source: str) -> None:
    x, y = handmade(classes=4, n_per_class=3)
    dist = np.array([[0, 1, 4, 2], [1, 0, 3, 3], [4, 3, 0, 1], [2, 3, 1, 0]], dtype=float)
    params: dict = {"strength": 2.0, "temperature": 0.3}
    if source == "csv":
        (tmp_path / "d.csv").write_text("\n".join(",".join(str(v) for v in row) for row in dist))
        params["distances"] = str(tmp_path / "d.csv")
    elif source == "json":
        (tmp_path / "d.json").write_text(json.dumps(dist.tolist()))
        params["distances"] = str(tmp_path / "d.json")
    spec = parse_loss_spec("clld", params={"clld": params})
    torch.manual_seed(0)
    term = CombinedLoss(spec, 4, x.shape[1]).dml["clld"]
    if source == "learned":
        e = F.normalize(term.label_model.W.detach().t().double(), dim=1)
        d = (1 - e @ e.t()) / 2
    else:
        d = torch.as_tensor(dist / dist.max())
    omega = 1 + 2.0 * (1 - d)
    value, extra = term(x, y)
    naive = naive_clld(x, y, omega, 0.3)
    assert extra["clld.contrastive"] == pytest.approx(num(naive), rel=1e-10)
    if source == "learned":
        # The label-embedding classifier's loss rides along; it sees detached features.
        labels_loss = pml.NormalizedSoftmaxLoss(4, x.shape[1], temperature=0.05).double()
        labels_loss.load_state_dict(term.label_model.state_dict())
        assert num(value) == pytest.approx(num(naive) + num(labels_loss(x, y)), rel=1e-10)
    else:
        assert num(value) == pytest.approx(num(naive), rel=1e-10)
    (g_ours,) = torch.autograd.grad(value, x)
    (g_naive,) = torch.autograd.grad(naive, x)
    torch.testing.assert_close(g_ours, g_naive, rtol=1e-8, atol=1e-12)
    if source != "learned":
        # Classes 0 and 1 are the closest pair, so class 1 is class 0's heaviest negative.
        w = term.negative_weights()
        assert w[0, 1] > w[0, 3] > w[0, 2] and torch.allclose(w, w.t())


def test_clld_with_strength_zero_is_supcon() -> None:
    x, y = handmade()
    term = CombinedLoss(parse_loss_spec("clld", params={"clld": {"strength": 0}}), 3, x.shape[1]).dml["clld"]
    value, extra = term(x, y)
    assert extra["clld.contrastive"] == pytest.approx(num(pml.SupConLoss(temperature=0.1)(x, y)), rel=1e-9)


def test_label_distance_files_are_checked(tmp_path: Path) -> None:
    bad = {"asym.csv": "0,1\n2,0", "neg.csv": "0,-1\n-1,0", "rect.csv": "0,1,2\n1,0,2", "text.csv": "0,a\na,0"}
    messages = {"asym.csv": "not symmetric", "neg.csv": "must be >= 0", "rect.csv": "square", "text.csv": "not a matrix"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]):
            parse_loss_spec("cce+clld", params={"clld": {"distances": str(tmp_path / name)}})
    (tmp_path / "ok.csv").write_text("0,1,2\n1,0,1\n2,1,0")
    assert load_label_distances(tmp_path / "ok.csv").shape == (3, 3)
    spec = parse_loss_spec("cce+clld", params={"clld": {"distances": str(tmp_path / "ok.csv")}})
    with pytest.raises(ValueError, match=r"is 3 × 3 but the task has 2 classes"):
        CombinedLoss(spec, 2, 8)


# ---------------------------------------------------------------- SCL as two objectives, EPO

def test_pull_and_push_equal_the_naive_loops() -> None:
    x, y = handmade(classes=3, n_per_class=3)
    tau = 0.25
    pull, push = scl_pull_push(x, y, tau)
    pulls, pushes = [], []
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        neg = [n for n in range(len(y)) if y[n] != y[i]]
        pulls.append(sum((1 - cos(x[i], x[p])) / tau for p in pos) / len(pos))
        pushes.append(torch.log(sum(torch.exp((cos(x[i], x[n]) + 1) / tau) for n in neg)) - math.log(len(neg)))
    naive_pull, naive_push = sum(pulls) / len(pulls), sum(pushes) / len(pushes)
    for ours, naive in ((pull, naive_pull), (push, naive_push)):
        assert num(ours) == pytest.approx(num(naive), rel=1e-10)
        torch.testing.assert_close(torch.autograd.grad(ours, x, retain_graph=True)[0],
                                   torch.autograd.grad(naive, x, retain_graph=True)[0], rtol=1e-8, atol=1e-12)
    assert 0 <= num(pull) <= 2 / tau and 0 <= num(push) <= 2 / tau


C1 = torch.tensor([0.0, 0.0], dtype=torch.float64)
C2 = torch.tensor([1.0, 0.0], dtype=torch.float64)


def two_quadratics(x: torch.Tensor) -> torch.Tensor:
    """l1 = |x - c1|², l2 = |x - c2|²: the Pareto front is the segment c1–c2."""
    return torch.stack([((x - C1) ** 2).sum(), ((x - C2) ** 2).sum()])


@pytest.mark.parametrize("pref", [(1.0, 1.0), (1.0, 3.0), (4.0, 1.0)])
def test_epo_converges_to_the_front_point_on_the_preference_ray(pref: tuple[float, float]) -> None:
    (point,) = trace_front(two_quadratics, [0.2, 1.0], [pref], steps=400, lr=0.02, eps=1e-6)
    l1, l2 = point.losses
    r1, r2 = pref
    assert abs(r1 * l1 - r2 * l2) / (r1 * l1 + r2 * l2) < 0.01  # the preference condition
    assert abs(point.x[1]) < 1e-3  # on the front (the segment between the two minima)
    # On the segment r1·l1 = r2·l2 puts x at sqrt(r2) / (sqrt(r1) + sqrt(r2)).
    assert point.x[0] == pytest.approx(math.sqrt(r2) / (math.sqrt(r1) + math.sqrt(r2)), abs=0.01)


def test_linear_scalarisation_reaches_the_weighted_minimum() -> None:
    for w in ((1.0, 3.0), (2.0, 1.0)):
        (point,) = trace_front(two_quadratics, [0.2, 1.0], [w], method="linear", steps=300, lr=0.05)
        expected = (w[0] * C1 + w[1] * C2) / (w[0] + w[1])
        assert point.x == pytest.approx(tuple(expected.tolist()), abs=1e-4)


def test_a_traced_front_is_ordered_by_preference() -> None:
    prefs = [(1.0, 4.0), (1.0, 1.0), (4.0, 1.0)]
    points = trace_front(two_quadratics, [0.6, -1.0], prefs, steps=400, lr=0.02, eps=1e-6)
    l1 = [p.losses[0] for p in points]
    assert l1[0] > l1[1] > l1[2]  # more weight on l1 → lower l1 at the end
    assert all(abs(p.x[1]) < 1e-3 for p in points)


def test_epo_weights_balance_then_descend() -> None:
    # Off the ray (r·l uneven), the worse objective's gradient dominates.
    gram = np.array([[1.0, 0.2], [0.2, 1.0]])
    beta, mode = epo_weights([4.0, 1.0], gram, [1.0, 1.0])
    assert mode == "balance" and beta[0] > 0.99
    # On the ray: a common descent direction (both decrease).
    beta, mode = epo_weights([1.0, 1.0], gram, [1.0, 1.0])
    assert mode == "descent" and np.all(gram @ beta >= -1e-12) and beta.sum() == pytest.approx(1)
    with pytest.raises(ValueError, match="preferences must be > 0"):
        epo_weights([1.0, 1.0], gram, [1.0, 0.0])


def test_moscl_epo_term_is_the_epo_combination_of_pull_and_push() -> None:
    x, y = handmade()
    term = CombinedLoss(parse_loss_spec("moscl", params={"moscl": {"pref_pull": 1.0, "pref_push": 2.0}}), 3, 6).dml["moscl"]
    value, extra = term(x, y)
    pull, push = scl_pull_push(x, y, 0.1)
    g = torch.stack([torch.autograd.grad(v, x, retain_graph=True)[0].flatten() for v in (pull, push)])
    beta, _ = epo_weights([num(pull), num(push)], (g @ g.t()).numpy(), [1.0, 2.0])
    assert extra["moscl.beta_pull"] == pytest.approx(beta[0], abs=1e-9)
    assert num(value) == pytest.approx(num(beta[0] * pull + beta[1] * push), rel=1e-10)
    lin = CombinedLoss(parse_loss_spec("moscl", params={"moscl": {"method": "linear", "pull_weight": 0.3}}), 3, 6).dml["moscl"]
    assert num(lin(x, y)[0]) == pytest.approx(num(0.3 * pull + push), rel=1e-10)


def test_scl_front_on_a_tiny_task(tuner_top: Finetuner, tree: Path) -> None:
    ep = make_episode(load_fewshot_task("MR", tree / "downstream"), 4, seed=0, max_test=8)
    cfg = FinetuneConfig(loss="cce+moscl", max_steps=2, batch_size=8)
    points = scl_front(tuner_top, ep, cfg, [(1.0, 3.0), (3.0, 1.0)])
    assert [p["preference"] for p in points] == [[1.0, 3.0], [3.0, 1.0]]
    assert all(p["pull"] >= 0 and p["push"] >= 0 and 0 <= p["beta_pull"] <= 1 for p in points)
    with pytest.raises(ValueError, match="must have a moscl term"):
        scl_front(tuner_top, ep, FinetuneConfig(loss="cce"), [(1.0, 1.0)])


# ---------------------------------------------------------------- learned ensembles

def test_ensemble_equals_the_uncertainty_weighting_formula() -> None:
    x, y = handmade()
    spec = parse_loss_spec("ensemble", params={"ensemble": {"members": "supcon,proxyanchor,tripletmargin",
                                                            "proxyanchor.margin": 0.2}})
    torch.manual_seed(0)
    term = CombinedLoss(spec, 3, 6).double().dml["ensemble"]
    with torch.no_grad():
        term.log_vars.copy_(torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64))
    value, extra = term(x, y)
    anchor = pml.ProxyAnchorLoss(num_classes=3, embedding_size=6, margin=0.2).double()
    anchor.load_state_dict(term.members["proxyanchor"].state_dict())
    parts = [pml.SupConLoss()(x, y), anchor(x, y), pml.TripletMarginLoss()(x, y)]
    s = [0.5, -0.3, 1.2]
    expected = sum(math.exp(-si) * num(li) + si for si, li in zip(s, parts, strict=True))
    assert num(value) == pytest.approx(expected, rel=1e-10)
    assert term.learned_weights() == pytest.approx({"supcon": math.exp(-0.5), "proxyanchor": math.exp(0.3),
                                                    "tripletmargin": math.exp(-1.2)})
    assert extra["ensemble.w.proxyanchor"] == pytest.approx(math.exp(0.3))


def test_ensemble_weights_move_during_training_and_stay_positive(tuner_top: Finetuner, tree: Path) -> None:
    ep = make_episode(load_fewshot_task("MR", tree / "downstream"), 6, seed=1, max_test=8)
    res = tuner_top.run(ep, FinetuneConfig(loss="cce+ensemble", max_steps=6, batch_size=12, lr=1e-3))
    assert len(res.learned_weights) == 6
    first, last = res.learned_weights[0], res.learned_weights[-1]
    assert set(last) == {"ensemble.supcon", "ensemble.proxyanchor"}
    assert all(abs(last[k] - first[k]) > 1e-3 for k in last)
    assert all(w > 0 for step in res.learned_weights for w in step.values())
    assert res.accuracy_proxy is not None  # proxyanchor member → nearest-proxy inference is available


# ---------------------------------------------------------------- joint contrastive classifier

def test_jcc_equals_the_naive_computation_and_predicts_the_nearest_prototype() -> None:
    x, y = handmade(classes=3)
    torch.manual_seed(0)
    term = CombinedLoss(parse_loss_spec("jcc", params={"jcc": {"temperature": 0.2, "supcon_weight": 0.5}}),
                        3, 6).double().dml["jcc"]
    value, _ = term(x, y)
    protos = term.proxies
    proto_ce = sum(-torch.log(torch.exp(cos(x[i], protos[y[i]]) / 0.2)
                              / sum(torch.exp(cos(x[i], protos[c]) / 0.2) for c in range(3))) for i in range(len(y))) / len(y)
    supcon = naive_clld(x, y, torch.ones(3, 3, dtype=torch.float64), 0.1)  # ω = 1: plain SupCon
    naive = proto_ce + 0.5 * supcon
    assert num(value) == pytest.approx(num(naive), rel=1e-9)
    g_ours = torch.autograd.grad(value, [x, term.prototype_loss.W])
    g_naive = torch.autograd.grad(naive, [x, term.prototype_loss.W])
    for a, b in zip(g_ours, g_naive, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-11)
    with torch.no_grad():
        cosines = torch.stack([torch.stack([cos(x[i], protos[c]) for c in range(3)]) for i in range(len(y))])
        assert predict_nearest_proxy(term, x.detach()).tolist() == cosines.argmax(1).tolist()


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "cce+scl"], "unknown term 'scl'"),
        (["--loss", "cce+scal", "--loss-param", "scal.epsilon=0"], "scal.epsilon must be a number > 0 (got 0)"),
        (["--loss", "cce+scal", "--loss-param", "scal.epsilon=-0.5"], "scal.epsilon must be a number > 0"),
        (["--loss", "cce+scal", "--loss-param", "scal.steps=0"], "scal.steps (k) must be an integer >= 1 (got 0)"),
        (["--loss", "cce+scal", "--loss-param", "scal.norm=l3"], "scal.norm must be one of l2, linf"),
        (["--loss", "cce+scal", "--loss-param", "scal.eps=1"], "scal has no argument eps"),
        (["--loss", "cce+moscl", "--loss-param", "moscl.method=mgda"], "moscl.method must be one of epo, linear"),
        (["--loss", "cce+ensemble", "--loss-param", "ensemble.members=supcon"], "needs at least two DML terms"),
        (["--loss", "cce+ensemble", "--loss-param", "ensemble.members=supcon,arcface"], "unknown term 'arcface'"),
        (["--loss", "cce+clld", "--inference", "proxy"], "inference: 'proxy' needs a proxy loss"),
    ],
)
def test_bad_objective_configs_are_one_clear_line(
    tiny_bert_dir: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    rc = main(["finetune", "--model", tiny_bert_dir, "--senteval-data", str(tree), "--output-dir", str(tmp_path),
               "--max-steps", "1", "--seeds", "1", "--device", "cpu", *args])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and last.startswith("diffcse finetune: error:")


def test_cli_label_distance_file_must_match_the_task_before_the_model_loads(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "d.json").write_text("[[0, 1, 2], [1, 0, 1], [2, 1, 0]]")
    # --model points nowhere: the distance file must be refused before any model is loaded.
    rc = main(["finetune", "--model", str(tmp_path / "no-model"), "--senteval-data", str(tree), "--task", "MR",
               "--loss", "cce+clld", "--loss-param", f"clld.distances={tmp_path / 'd.json'}", "--device", "cpu"])
    assert rc == 2
    assert "d.json is 3 × 3 but the task has 2 classes" in capsys.readouterr().err


def test_cli_runs_the_new_objectives_end_to_end(tiny_bert_dir: str, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "fs"
    common = ["finetune", "--model", tiny_bert_dir, "--task", "MR", "--shots", "3", "--seeds", "1", "--max-steps", "2",
              "--senteval-data", str(tree), "--output-dir", str(out), "--device", "cpu", "--train-layers", "1"]
    assert main([*common, "--loss", "jcc+ensemble", "--inference", "proxy", "--loss-param", "scal.steps=2"]) == 2
    assert main([*common, "--loss", "jcc+ensemble", "--inference", "proxy"]) == 0
    res = json.loads((out / "MR-3shot-jcc_ensemble-proxy" / "results.json").read_text())
    assert set(res["learned_loss_weights"]) == {"ensemble.supcon", "ensemble.proxyanchor"}
    assert len(res["runs"][0]["learned_weights"]) == 2 and res["runs"][0]["accuracy_proxy"] is not None
    assert main([*common, "--loss", "cce+scal+clld+moscl", "--loss-param", "scal.steps=2",
                 "--loss-param", "scal.norm=linf", "--loss-param", "scal.epsilon=0.05"]) == 0
    res = json.loads((out / "MR-3shot-cce_scal_clld_moscl-classifier" / "results.json").read_text())
    last = res["runs"][0]["loss_last"]
    assert {"scal", "clld", "moscl", "moscl.pull", "moscl.push", "scal.delta_norm"} <= set(last)
    assert last["scal.delta_norm"] == pytest.approx(0.05)
    assert res["loss_params"]["scal"] == {"steps": 2, "norm": "linf", "epsilon": 0.05}
    # A pair task: both sentences are perturbed, each in its own ball; the term compares pair features.
    pair = [a if a != "MR" else "MRPC" for a in common]
    assert main([*pair, "--loss", "cce+scal", "--loss-param", "scal.epsilon=0.3"]) == 0
    res = json.loads((out / "MRPC-3shot-cce_scal-classifier" / "results.json").read_text())
    assert res["runs"][0]["loss_last"]["scal.delta_norm"] == pytest.approx(0.3)
