"""Fine-tuning losses on hand-made embeddings: pytorch-metric-learning values, weighted sums, descent, proxies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from diffcse.finetune import FinetuneConfig
from diffcse.finetune.losses import (
    DML_LOSSES,
    CombinedLoss,
    build_dml_loss,
    parse_loss_spec,
    predict_nearest_proxy,
    proxy_scores,
)

PML = {
    "proxyanchor": pml.ProxyAnchorLoss,
    "softtriple": pml.SoftTripleLoss,
    "supcon": pml.SupConLoss,
    "proxynca": pml.ProxyNCALoss,
    "tripletmargin": pml.TripletMarginLoss,
}


def handmade(n_per_class: int = 6, classes: int = 3, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy class clusters: class c sits near a random direction, plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[labels] + 1.5 * torch.randn(len(labels), dim, generator=g)
    return x, labels


def reference(name: str, spec_params: dict, classes: int, dim: int, ours: CombinedLoss) -> torch.nn.Module:
    """pytorch-metric-learning's own loss object with our term's arguments and proxies."""
    cls = PML[name]
    ref = cls(num_classes=classes, embedding_size=dim, **spec_params) if name in ("proxyanchor", "softtriple", "proxynca") else cls(**spec_params)
    ref.load_state_dict(ours.dml[name].state_dict())
    return ref


@pytest.mark.parametrize("name", DML_LOSSES)
def test_dml_term_equals_pytorch_metric_learning(name: str) -> None:
    x, y = handmade()
    spec = parse_loss_spec(name)
    torch.manual_seed(1)
    ours = CombinedLoss(spec, 3, x.shape[1])
    ref = reference(name, spec.params.get(name, {}), 3, x.shape[1], ours)
    logits = torch.randn(len(y), 3)
    out = ours(logits, x, y)
    expected = float(ref(x, y).detach())
    assert out.parts[name] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # No CCE term: the head's linear-probe CE rides along and is reported separately.
    probe = float(F.cross_entropy(logits, y))
    assert out.parts["probe"] == pytest.approx(probe, rel=1e-6)
    assert float(out.total.detach()) == pytest.approx(expected + probe, rel=1e-5)


@pytest.mark.parametrize(
    ("spec_text", "weights", "params"),
    [
        ("cce+proxyanchor", {"cce": 0.3, "proxyanchor": 2.0}, {"proxyanchor": {"margin": 0.2, "alpha": 16}}),
        ("tripleentropy", None, None),
        ("cce+supcon", {"supcon": 0.5}, {"supcon": {"temperature": 0.2}}),
        ("cce+softtriple+proxynca", None, None),
    ],
)
def test_combined_loss_is_the_weighted_sum_of_parts(spec_text: str, weights: dict | None, params: dict | None) -> None:
    x, y = handmade()
    spec = parse_loss_spec(spec_text, weights, params)
    torch.manual_seed(2)
    ours = CombinedLoss(spec, 3, x.shape[1])
    logits = torch.randn(len(y), 3)
    total = float(ours(logits, x, y).total.detach())
    expected = 0.0
    for term, w in spec.weights.items():
        if term == "cce":
            part = float(F.cross_entropy(logits, y))
        else:
            part = float(reference(term, spec.params.get(term, {}), 3, x.shape[1], ours)(x, y).detach())
        expected += w * part
    assert total == pytest.approx(expected, rel=1e-5)
    if params:
        for term, kwargs in params.items():
            for k, v in kwargs.items():
                assert getattr(ours.dml[term], k) == v


def test_tripleentropy_uses_the_papers_weighting() -> None:
    spec = parse_loss_spec("TripleEntropy")
    assert spec.weights == {"cce": 0.4, "softtriple": 0.6}
    st = CombinedLoss(spec, 2, 4).dml["softtriple"]
    assert (st.la, st.margin, st.centers_per_class) == (8.0, 0.1, 5)
    assert st.gamma == pytest.approx(1 / 0.1)  # pml stores 1/gamma


@pytest.mark.parametrize("spec_text", ["cce", *DML_LOSSES, "cce+proxyanchor", "tripleentropy", "cce+supcon",
                                       "jcc", "cce+moscl"])
def test_each_loss_decreases_when_optimising_handmade_embeddings(spec_text: str) -> None:
    x, y = handmade(seed=3)
    emb = torch.nn.Parameter(x.clone())
    spec = parse_loss_spec(spec_text)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], 3)
    loss = CombinedLoss(spec, 3, x.shape[1])
    opt = torch.optim.Adam([
        {"params": [emb, *head.parameters()], "lr": 0.05},
        {"params": loss.proxy_parameters(), "lr": 0.1},
    ])
    values = []
    for _ in range(40):
        logits = head(emb if spec.has_cce else emb.detach())
        out = loss(logits, emb, y)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        values.append(float(out.total.detach()))
    assert values[-1] < 0.8 * values[0], values[::8]


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="unknown term 'arcface'"):
        parse_loss_spec("cce+arcface")
    with pytest.raises(ValueError, match="loss weight: 'supcon' is not a term"):
        parse_loss_spec("cce+proxyanchor", {"supcon": 1.0})
    with pytest.raises(ValueError, match="loss param: 'cce'"):
        parse_loss_spec("cce+proxyanchor", None, {"cce": {"x": 1}})
    with pytest.raises(ValueError, match="appears twice"):
        parse_loss_spec("cce+cce")
    with pytest.raises(ValueError, match="proxyanchor has no argument temperature"):
        build_dml_loss("proxyanchor", 2, 4, temperature=0.1)
    with pytest.raises(ValueError, match="inference: 'proxy' needs a proxy loss"):
        FinetuneConfig(loss="cce+supcon", inference="proxy").validate()
    with pytest.raises(ValueError, match="inference: .knn. is not one of classifier, proxy"):
        FinetuneConfig(inference="knn").validate()


def test_nearest_proxy_inference() -> None:
    dim, classes = 6, 3
    eye = torch.eye(dim)
    feats = torch.stack([eye[2] + 0.1 * eye[0], eye[0] * 3.0, eye[1] - 0.2 * eye[2], -eye[0]])
    # ProxyAnchor / ProxyNCA: one proxy per class, placed on axes 0, 1, 2.
    for name in ("proxyanchor", "proxynca"):
        loss = build_dml_loss(name, classes, dim)
        with torch.no_grad():
            loss.proxies.copy_(eye[:classes])
        assert predict_nearest_proxy(loss, feats).tolist()[:3] == [2, 0, 1]
    # The last vector points away from axis 0, so it is nearest to whichever other proxy: not class 0.
    assert predict_nearest_proxy(loss, feats)[3] != 0
    # SoftTriple (2 centers per class, laid out class-major): class 0's second center sits next to
    # the first vector, class 2's first center is further off, so the vector goes to class 0.
    st = build_dml_loss("softtriple", classes, dim, centers_per_class=2)
    centers = torch.stack([eye[0], eye[2] + 0.05 * eye[0], eye[1], -eye[1], eye[2] + 0.5 * eye[3], -eye[2]])
    with torch.no_grad():
        st.fc.copy_(centers.t())
    scores = proxy_scores(st, feats)
    assert scores.shape == (4, classes)
    assert predict_nearest_proxy(st, feats).tolist()[:3] == [0, 0, 1]
    with pytest.raises(ValueError, match="has no proxies"):
        proxy_scores(pml.SupConLoss(), feats)
