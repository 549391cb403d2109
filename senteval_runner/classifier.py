"""SentEval's logistic-regression classifier, twice: a plain per-model reference and a batched trainer.

What SentEval's PyTorch ``MLP(nhid=0)`` does, and both paths here replicate:
- ``nn.Linear(D, C)`` initialised right after ``torch.manual_seed(seed)``, so every classifier
  of a run starts from the same weights; the global numpy RNG is seeded with ``seed`` too and
  then drives the 5% validation split (if any) and one permutation per pass over the data.
- Cross-entropy with *mean* reduction (SentEval sets ``size_average = False`` after
  construction, which PyTorch >= 0.4.1 ignores), Adam (or RMSprop) with default
  hyper-parameters and ``weight_decay = l2`` (coupled L2, also on the bias).
- One "epoch" = ``epoch_size`` passes in mini-batches of ``batch_size`` (the last batch of a
  pass is smaller); after each epoch, validation accuracy; keep a copy of the model when it
  strictly improves; otherwise count a miss, and stop once ``tenacity`` misses had already been
  counted (the counter never resets). At most ``max_epoch`` (epochs are counted in passes).

The batched trainer fits many such models at once as a [G, C, R, D+1] weight tensor: G groups
that share a training set and therefore (same seed, same size) the very same mini-batches,
R models per group that differ only in L2. Each model keeps its own Adam state, step count,
early-stopping state and best copy, so the protocol is unchanged; only the float summation
order differs from the per-model path (see tests and docs/evaluation.md for the comparison).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import fused


@dataclass(frozen=True)
class ClassifierConfig:
    """SentEval classifier settings (SimCSE's 'test' and 'fasttest' configs are below)."""

    optim: str = "adam"
    batch_size: int = 64
    tenacity: int = 5
    epoch_size: int = 4
    max_epoch: int = 200
    kfold: int = 10

    def as_dict(self) -> dict[str, object]:
        """Plain dict for reports."""
        return {
            "nhid": 0,
            "optim": self.optim,
            "batch_size": self.batch_size,
            "tenacity": self.tenacity,
            "epoch_size": self.epoch_size,
            "max_epoch": self.max_epoch,
            "kfold": self.kfold,
        }


CONFIGS = {
    "test": ClassifierConfig("adam", 64, 5, 4, 200, 10),
    "fasttest": ClassifierConfig("rmsprop", 128, 3, 2, 200, 5),
}
CONFIGS["dev"] = CONFIGS["fasttest"]

# torch.optim defaults, which SentEval's get_optimizer("adam"/"rmsprop") leaves untouched.
ADAM = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
RMSPROP = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}


@dataclass
class FitSpec:
    """One classifier to fit: rows of X to train on, and either explicit validation rows or a split."""

    train_idx: np.ndarray
    l2: float
    val_idx: np.ndarray | None = None
    validation_split: float | None = None

    def __post_init__(self) -> None:
        """Exactly one of val_idx / validation_split, as in SentEval's prepare_split."""
        if (self.val_idx is None) == (self.validation_split is None):
            raise ValueError("give exactly one of val_idx or validation_split")
        self.train_idx = np.asarray(self.train_idx, dtype=np.int64)
        if self.val_idx is not None:
            self.val_idx = np.asarray(self.val_idx, dtype=np.int64)


@dataclass
class FitResult:
    """A fitted classifier: its best validation accuracy and the weights of that best epoch."""

    val_correct: int
    n_val: int
    weight: torch.Tensor  # [D+1, C]; last row is the bias
    epochs: int = 0
    steps: int = 0

    @property
    def val_accuracy(self) -> float:
        """Best validation accuracy, computed as SentEval does (1.0 * correct / n)."""
        return 1.0 * self.val_correct / self.n_val


def split_indices(train_idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.random.RandomState]:
    """SentEval's validation split: first permutation of a freshly seeded RNG; returns (train, val, rng)."""
    rs = np.random.RandomState(seed)
    perm = rs.permutation(len(train_idx))
    k = int(fraction * len(train_idx))
    return train_idx[perm[k:]], train_idx[perm[:k]], rs


def _init_linear(dim: int, nclasses: int, seed: int) -> nn.Linear:
    """nn.Linear created right after torch.manual_seed(seed), without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(dim, nclasses)


def initial_weight(dim: int, nclasses: int, seed: int) -> torch.Tensor:
    """The [D+1, C] augmented weight every classifier of a run starts from (bias as last row)."""
    lin = _init_linear(dim, nclasses, seed)
    return torch.cat([lin.weight.detach().t(), lin.bias.detach()[None, :]], 0).contiguous()


def predict(X: np.ndarray | torch.Tensor, weight: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Class predictions (argmax of logits) for rows of X under an augmented [D+1, C] weight."""
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32)) if not torch.is_tensor(X) else X
    w = weight.to(Xt.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(Xt), batch_size):
            xb = Xt[i : i + batch_size]
            out.append((xb @ w[:-1] + w[-1]).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- reference path


def fit_reference(X: np.ndarray, y: np.ndarray, spec: FitSpec, nclasses: int, cfg: ClassifierConfig,
                  seed: int = 1111, device: str = "cpu") -> FitResult:
    """Fit one classifier the way SentEval does, one nn.Linear + torch.optim at a time (slow path)."""
    if spec.validation_split is not None:
        tr, va, rs = split_indices(spec.train_idx, spec.validation_split, seed)
    else:
        tr, va, rs = spec.train_idx, spec.val_idx, np.random.RandomState(seed)
    dev = torch.device(device)
    Xtr = torch.as_tensor(X[tr], dtype=torch.float32, device=dev)
    ytr = torch.as_tensor(y[tr], dtype=torch.int64, device=dev)
    Xva = torch.as_tensor(X[va], dtype=torch.float32, device=dev)
    yva = torch.as_tensor(y[va], dtype=torch.int64, device=dev)
    model = _init_linear(X.shape[1], nclasses, seed).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    if cfg.optim == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), weight_decay=spec.l2, foreach=False)
    elif cfg.optim == "rmsprop":
        opt = torch.optim.RMSprop(model.parameters(), weight_decay=spec.l2, foreach=False)
    else:
        raise ValueError(f"unsupported optimizer {cfg.optim!r}")

    def score() -> int:
        """Correct validation predictions, in batches as SentEval scores."""
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(Xva), cfg.batch_size):
                pred = model(Xva[i : i + cfg.batch_size]).argmax(1)
                correct += int((pred == yva[i : i + cfg.batch_size]).sum())
        return correct

    nepoch, best, misses, steps = 0, -1, 0, 0
    best_model = copy.deepcopy(model)
    stop = False
    while not stop and nepoch <= cfg.max_epoch:
        model.train()
        for _ in range(cfg.epoch_size):
            perm = torch.from_numpy(rs.permutation(len(Xtr))).to(dev)
            for i in range(0, len(Xtr), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                loss = loss_fn(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
        nepoch += cfg.epoch_size
        correct = score()
        if correct > best:
            best = correct
            best_model = copy.deepcopy(model)
        else:
            if misses >= cfg.tenacity:
                stop = True
            misses += 1
    w = torch.cat([best_model.weight.detach().t(), best_model.bias.detach()[None, :]], 0).cpu()
    return FitResult(best, len(va), w, nepoch, steps)


# ---------------------------------------------------------------- batched path


@dataclass
class _Group:
    """Models sharing one training set (hence identical mini-batches) and one validation set."""

    train: np.ndarray
    val: np.ndarray
    key: tuple  # identifies the RNG stream: (validation_split, rows given, rows trained on)
    members: list[int] = field(default_factory=list)


def _group_specs(specs: list[FitSpec], seed: int) -> tuple[list[_Group], dict[tuple, np.random.RandomState]]:
    """Group specs with identical training rows, validation rows and split; one RNG per stream."""
    groups: dict[tuple, _Group] = {}
    rngs: dict[tuple, np.random.RandomState] = {}
    for k, s in enumerate(specs):
        key = (s.train_idx.tobytes(), None if s.val_idx is None else s.val_idx.tobytes(), s.validation_split)
        g = groups.get(key)
        if g is None:
            if s.validation_split is not None:
                tr, va, rs = split_indices(s.train_idx, s.validation_split, seed)
            else:
                tr, va, rs = s.train_idx, s.val_idx, np.random.RandomState(seed)
            # Same seed + same split setting + same sizes => the same permutation sequence,
            # so groups with equal stream keys share one RNG and one draw per pass.
            skey = (s.validation_split, len(s.train_idx), len(tr))
            rngs.setdefault(skey, rs)
            g = groups[key] = _Group(tr, va, skey)
        g.members.append(k)
    return list(groups.values()), rngs


class _PermStream:
    """One permutation per pass per distinct RNG stream, shared by the groups on that stream."""

    def __init__(self, rngs: dict[tuple, np.random.RandomState]) -> None:
        """Keep each stream's RNG (already advanced past the validation split, if any)."""
        self.rngs = rngs
        self.cache: dict[tuple, tuple[int, np.ndarray]] = {}

    def next(self, key: tuple, pass_no: int) -> np.ndarray:
        """The permutation for pass ``pass_no`` of stream ``key``."""
        hit = self.cache.get(key)
        if hit is not None and hit[0] == pass_no:
            return hit[1]
        perm = self.rngs[key].permutation(key[2])
        self.cache[key] = (pass_no, perm)
        return perm


KERNELS = ("auto", "fused", "torch")


def resolve_kernel(kernel: str, device: str = "cpu") -> str:
    """Which batched kernel runs: 'fused' (numba, CPU) or 'torch'; 'auto' picks fused on CPU if it can."""
    if kernel not in KERNELS:
        raise ValueError(f"classifier kernel: {kernel!r} is not one of {', '.join(KERNELS)}")
    cpu = torch.device(device).type == "cpu"
    if kernel == "auto":
        return "fused" if cpu and fused.available() else "torch"
    if kernel == "fused" and not cpu:
        raise ValueError(f"classifier kernel 'fused' runs on the CPU only, not on {device!r}")
    if kernel == "fused" and not fused.available():
        raise ValueError("classifier kernel 'fused' needs numba: pip install numba")
    return kernel


def kernel_description(kernel: str | None) -> str:
    """How a run's classifiers were trained, for reports."""
    if kernel is None:
        return "reference (one torch model at a time)"
    if kernel == "fused":
        return f"fused (numba, {fused.threads()} threads)"
    return "torch (batched ops)"


def fit_batched(X: np.ndarray, y: np.ndarray, specs: list[FitSpec], nclasses: int, cfg: ClassifierConfig,
                seed: int = 1111, device: str = "cpu", val_chunk_elems: int = 8_000_000,
                kernel: str = "auto") -> list[FitResult]:
    """Fit every spec as one batched model; same protocol per model as ``fit_reference``.

    kernel: 'fused' runs the training passes in senteval_runner.fused (numba, CPU only), 'torch'
    as batched torch ops on any device; 'auto' = fused on CPU when numba is installed.
    """
    use_fused = resolve_kernel(kernel, device) == "fused"
    if cfg.optim not in ("adam", "rmsprop"):
        raise ValueError(f"unsupported optimizer {cfg.optim!r} (SentEval's configs use adam or rmsprop)")
    if not specs:
        return []
    dev = torch.device(device)
    n, d = X.shape
    C = nclasses
    groups, rngs = _group_specs(specs, seed)
    G = len(groups)
    R = max(len(g.members) for g in groups)
    B = cfg.batch_size

    # Augmented features (a ones column) make the bias part of the weight: one bmm per step.
    Xa = torch.empty((n, d + 1), dtype=torch.float32, device=dev)
    Xa[:, :d] = torch.as_tensor(X, dtype=torch.float32)
    Xa[:, d] = 1.0
    yt = torch.as_tensor(y, dtype=torch.int64, device=dev)

    w0 = initial_weight(d, C, seed).to(dev)  # [D+1, C]
    # Layout [G, C, R, D+1]: the bmm's output is [G, C*R, batch], so softmax and argmax reduce
    # over a leading axis (torch is slow at reductions over a last axis of size 2..6 on CPU),
    # and both bmm's have the wide D+1 as their last axis (2x faster than the transposed forms).
    P = w0.t()[None, :, None, :].repeat(G, 1, R, 1).contiguous()
    m1 = torch.zeros_like(P)
    m2 = torch.zeros_like(P) if cfg.optim == "adam" else None
    best_P = P.clone()
    wd = torch.zeros((G, 1, R, 1), dtype=torch.float32, device=dev)
    alive = torch.zeros((G, R), dtype=torch.bool)  # padding slots of short groups start dead
    for gi, g in enumerate(groups):
        for r, k in enumerate(g.members):
            wd[gi, 0, r, 0] = specs[k].l2
            alive[gi, r] = True
    best = torch.full((G, R), -1, dtype=torch.int64)
    misses = torch.zeros((G, R), dtype=torch.int64)
    epochs_run = torch.zeros((G, R), dtype=torch.int64)
    t = torch.zeros(G, dtype=torch.float64)  # Adam step per group (members step together)

    ntrain = np.array([len(g.train) for g in groups])
    nval = np.array([len(g.val) for g in groups])
    streams = _PermStream(rngs)
    nb = -(-ntrain // B)  # batches per pass, per group
    # Padded validation rows per group, for one batched accuracy computation per epoch.
    Vmax = int(nval.max())
    val_rows = np.zeros((G, Vmax), dtype=np.int64)
    val_mask = np.zeros((G, Vmax), dtype=bool)
    for gi, g in enumerate(groups):
        val_rows[gi, : len(g.val)] = g.val
        val_mask[gi, : len(g.val)] = True
    val_rows_t = torch.as_tensor(val_rows, device=dev)
    val_y = yt[val_rows_t]
    val_mask_t = torch.as_tensor(val_mask, device=dev)

    active = np.arange(G)  # groups with at least one live model
    nepoch = 0
    pass_no = 0
    while len(active) and nepoch <= cfg.max_epoch:
        a_idx = torch.as_tensor(active, device=dev)
        if use_fused:
            _fused_epoch(Xa, yt, groups, active, streams, pass_no, ntrain, P, m1, m2, wd, alive, t, cfg)
            Pa = P[a_idx]
        else:
            Pa = _torch_epoch(Xa, yt, groups, active, streams, pass_no, nb, P, m1, m2, wd, alive, t, cfg)
        pass_no += cfg.epoch_size
        nepoch += cfg.epoch_size
        # Validation accuracy of every live model (chunked to bound memory).
        correct = _val_correct(Xa, Pa, val_rows_t[a_idx], val_y[a_idx], val_mask_t[a_idx], R, C, val_chunk_elems)
        act_t = torch.as_tensor(active)
        live_c = alive[act_t]
        epochs_run[act_t] = torch.where(live_c, torch.full_like(epochs_run[act_t], nepoch), epochs_run[act_t])
        improved = live_c & (correct > best[act_t])
        missed = live_c & ~improved
        stop_now = missed & (misses[act_t] >= cfg.tenacity)
        best[act_t] = torch.where(improved, correct, best[act_t])
        misses[act_t] = misses[act_t] + missed.to(torch.int64)
        alive[act_t] = live_c & ~stop_now
        if bool(improved.any()):
            imp = improved.to(dev)[:, None, :, None]
            best_P[a_idx] = torch.where(imp, Pa, best_P[a_idx])
        active = active[alive[act_t].any(1).numpy()]

    out: list[FitResult | None] = [None] * len(specs)
    for gi, g in enumerate(groups):
        for r, k in enumerate(g.members):
            out[k] = FitResult(int(best[gi, r]), int(nval[gi]), best_P[gi, :, r, :].t().detach().cpu().contiguous(),
                               int(epochs_run[gi, r]), int(epochs_run[gi, r]) * int(nb[gi]))
    return out  # type: ignore[return-value]


def _epoch_rows(groups: list[_Group], active: np.ndarray, streams: _PermStream, pass_no: int,
                passes: int) -> np.ndarray:
    """Training rows of each active group for the next ``passes`` passes, in mini-batch order."""
    maxn = max(len(groups[gi].train) for gi in active)
    rows = np.zeros((len(active), passes, maxn), dtype=np.int64)
    # Pass-major: groups on one RNG stream must all take pass p before anyone draws pass p+1.
    for p in range(passes):
        for j, gi in enumerate(active):
            g = groups[gi]
            rows[j, p, : len(g.train)] = g.train[streams.next(g.key, pass_no + p)]
    return rows


def _fused_epoch(Xa: torch.Tensor, yt: torch.Tensor, groups: list[_Group], active: np.ndarray,
                 streams: _PermStream, pass_no: int, ntrain: np.ndarray, P: torch.Tensor, m1: torch.Tensor,
                 m2: torch.Tensor | None, wd: torch.Tensor, alive: torch.Tensor, t: torch.Tensor,
                 cfg: ClassifierConfig) -> None:
    """One epoch (epoch_size passes) of every active group with the fused CPU kernel, in place."""
    rows = _epoch_rows(groups, active, streams, pass_no, cfg.epoch_size)
    G, _, R, _ = P.shape
    fused.train_passes(Xa.numpy(), yt.numpy(), active.astype(np.int64), rows, ntrain[active].astype(np.int64),
                       P.numpy(), m1.numpy(),
                       None if m2 is None else m2.numpy(), wd.view(G, R).numpy(), alive.numpy(), t.numpy(),
                       cfg.batch_size, cfg.optim, ADAM if cfg.optim == "adam" else RMSPROP)


def _torch_epoch(Xa: torch.Tensor, yt: torch.Tensor, groups: list[_Group], active: np.ndarray,
                 streams: _PermStream, pass_no: int, nb: np.ndarray, P: torch.Tensor, m1: torch.Tensor,
                 m2: torch.Tensor | None, wd: torch.Tensor, alive: torch.Tensor, t: torch.Tensor,
                 cfg: ClassifierConfig) -> torch.Tensor:
    """One epoch of every active group as batched torch ops (any device); returns the active groups' P."""
    dev = P.device
    B, C, R = cfg.batch_size, P.shape[1], P.shape[2]
    a_idx = torch.as_tensor(active, device=dev)
    Pa, M1a = P[a_idx], m1[a_idx]
    M2a = m2[a_idx] if m2 is not None else None
    wda = wd[a_idx]
    # Stopped members of a live group are still computed but never update P.
    live = alive[torch.as_tensor(active)].to(dev)[:, None, :, None].to(torch.float32)
    Ga = len(active)
    nb_a = nb[active]
    nbmax = int(nb_a.max())
    all_rows = _epoch_rows(groups, active, streams, pass_no, cfg.epoch_size)
    for p in range(cfg.epoch_size):
        rows = np.zeros((Ga, nbmax * B), dtype=np.int64)
        wrow = np.zeros((Ga, nbmax * B), dtype=np.float32)
        for j, gi in enumerate(active):
            n = len(groups[gi].train)
            rows[j, :n] = all_rows[j, p, :n]
            # Mean loss over the real rows of each mini-batch (the last one is shorter).
            sizes = np.minimum(B, n - B * np.arange(nb[gi]))
            wrow[j, :n] = np.repeat(1.0 / sizes, sizes)
        rows_t = torch.as_tensor(rows.reshape(Ga, nbmax, B).transpose(1, 0, 2).copy(), device=dev)
        wrow_t = torch.as_tensor(wrow.reshape(Ga, nbmax, B).transpose(1, 0, 2).copy(), device=dev)
        for s in range(nbmax):
            sel = None if s < int(nb_a.min()) else np.nonzero(nb_a > s)[0]
            _step(Xa, yt, rows_t[s], wrow_t[s], Pa, M1a, M2a, wda, live, t, active, sel, cfg, R, C)
    P[a_idx], m1[a_idx] = Pa, M1a
    if m2 is not None:
        m2[a_idx] = M2a
    return Pa


def _step(Xa: torch.Tensor, yt: torch.Tensor, rows: torch.Tensor, wrow: torch.Tensor, P: torch.Tensor,
          M1: torch.Tensor, M2: torch.Tensor | None, wd: torch.Tensor, live: torch.Tensor, t: torch.Tensor,
          active: np.ndarray, sel: np.ndarray | None, cfg: ClassifierConfig, R: int, C: int) -> None:
    """One optimiser step for the active groups (or the subset ``sel`` that still has a batch)."""
    if sel is not None:
        si = torch.as_tensor(sel, device=P.device)
        Pw, M1w = P[si], M1[si]
        M2w = M2[si] if M2 is not None else None
        wdw, livew, rows, wrow = wd[si], live[si], rows[si], wrow[si]
        gids = torch.as_tensor(active[sel])
    else:
        Pw, M1w, M2w, wdw, livew = P, M1, M2, wd, live
        gids = torch.as_tensor(active)
    Gs, Bq = rows.shape
    Dp = Xa.shape[1]
    flat = rows.reshape(-1)
    xb = Xa.index_select(0, flat).view(Gs, Bq, Dp)
    # logits, class-major: [G, C, R, B]
    lg = torch.bmm(Pw.view(Gs, C * R, Dp), xb.transpose(1, 2)).view(Gs, C, R, Bq)
    # d(mean CE)/d(logits) = (softmax - onehot) / batch_size; padded rows have weight 0.
    lg.sub_(lg.amax(1, keepdim=True)).exp_()
    lg.div_(lg.sum(1, keepdim=True))
    yb = yt.index_select(0, flat).view(Gs, 1, 1, Bq)
    lg.sub_((yb == torch.arange(C, device=lg.device).view(1, C, 1, 1)).to(lg.dtype))
    lg.mul_(wrow.view(Gs, 1, 1, Bq))
    grad = torch.bmm(lg.view(Gs, C * R, Bq), xb).view(Gs, C, R, Dp)
    grad.addcmul_(Pw, wdw)  # coupled L2, as torch.optim's weight_decay
    t[gids] += 1
    tg = t[gids]
    if cfg.optim == "adam":
        b1, b2, lr, eps = ADAM["beta1"], ADAM["beta2"], ADAM["lr"], ADAM["eps"]
        M1w.lerp_(grad, 1 - b1)
        M2w.mul_(b2).addcmul_(grad, grad, value=1 - b2)  # type: ignore[union-attr]
        bc1 = 1 - b1 ** tg
        bc2_sqrt = (1 - b2 ** tg).sqrt()
        step_size = (lr / bc1).to(torch.float32).view(Gs, 1, 1, 1) * livew
        denom = (M2w.sqrt() / bc2_sqrt.to(torch.float32).view(Gs, 1, 1, 1)).add_(eps)  # type: ignore[union-attr]
        upd = M1w / denom
    else:
        a, lr, eps = RMSPROP["alpha"], RMSPROP["lr"], RMSPROP["eps"]
        M1w.mul_(a).addcmul_(grad, grad, value=1 - a)
        upd = grad / M1w.sqrt().add_(eps)
        step_size = lr * livew
    Pw.sub_(upd.mul_(step_size))
    if sel is not None:
        P[si], M1[si] = Pw, M1w
        if M2 is not None:
            M2[si] = M2w


def _val_correct(Xa: torch.Tensor, P: torch.Tensor, rows: torch.Tensor, yv: torch.Tensor, mask: torch.Tensor,
                 R: int, C: int, chunk_elems: int) -> torch.Tensor:
    """Number of correctly classified validation rows per (group, member), chunked over groups."""
    G, V = rows.shape
    Dp = Xa.shape[1]
    per = max(1, chunk_elems // max(1, V * Dp))
    out = []
    with torch.no_grad():
        for i in range(0, G, per):
            r = rows[i : i + per]
            g = len(r)
            xv = Xa.index_select(0, r.reshape(-1)).view(g, V, Dp)
            logits = torch.bmm(P[i : i + per].reshape(g, C * R, Dp), xv.transpose(1, 2)).view(g, C, R, V)
            pred = _argmax_classes(logits)  # [g, R, V]
            ok = (pred == yv[i : i + per, None, :]) & mask[i : i + per, None, :]
            out.append(ok.sum(2).cpu())
    return torch.cat(out, 0)


def _argmax_classes(logits: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of [G, C, R, V] (first index on ties, like torch.max), without a small-axis reduction."""
    best = logits[:, 0]
    idx = torch.zeros(best.shape, dtype=torch.int64, device=logits.device)
    for c in range(1, logits.shape[1]):
        lc = logits[:, c]
        idx = torch.where(lc > best, torch.full_like(idx, c), idx)
        best = torch.maximum(best, lc)
    return idx


def steps_per_pass(n: int, batch_size: int) -> int:
    """Mini-batches in one pass over n rows."""
    return math.ceil(n / batch_size)
