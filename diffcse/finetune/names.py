"""Task and loss names, kept free of heavy imports so the command line can list them cheaply."""

from __future__ import annotations

from typing import Any

FEWSHOT_TASKS = ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC")
CV_TASKS = ("MR", "CR", "SUBJ", "MPQA")
PAIR_TASKS = ("MRPC",)

CCE = "cce"
DML_LOSSES = ("proxyanchor", "softtriple", "supcon", "proxynca", "tripletmargin")
PROXY_LOSSES = ("proxyanchor", "softtriple", "proxynca")
# Our own objectives (diffcse.finetune.objectives): SCAL, CLLD, SCL as two-objective optimisation,
# learned loss ensembles, the joint contrastive (prototype) classifier.
OBJECTIVES = ("scal", "clld", "moscl", "ensemble", "jcc")
LOSS_TERMS = (CCE, *DML_LOSSES, *OBJECTIVES)
ENSEMBLE_DEFAULT_MEMBERS = "supcon,proxyanchor"

# TripleEntropy (Sosnowski et al. 2021/2022): beta * CCE + (1 - beta) * SoftTriple, with the
# authors' train_cross_validation.py defaults beta=0.4, la=8, gamma=0.1, margin=0.1, 5 centers.
ALIASES: dict[str, tuple[str, dict[str, float], dict[str, dict[str, Any]]]] = {
    "tripleentropy": (
        "cce+softtriple",
        {"cce": 0.4, "softtriple": 0.6},
        {"softtriple": {"la": 8.0, "gamma": 0.1, "margin": 0.1, "centers_per_class": 5}},
    ),
}
