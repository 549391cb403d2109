"""A fused CPU kernel (numba) for the batched classifier: gather, softmax-CE gradient and optimiser step.

Why: on CPU the torch formulation of one batched step (index_select of the mini-batch rows, two
bmm's of shape [G, C*R, D+1] x [G, D+1, 64], a dozen elementwise Adam ops over the [G, C, R, D+1]
weights) is memory-bound: each op streams its operands through memory, and torch's bmm ran at
10-16 GFLOP/s on these small matrices in a one-off reading. Here each group runs all its
mini-batches of an epoch in one thread, with its weights, moments and gradient in L1/L2; groups
are independent, so they are spread over the cores with ``prange``. scripts/bench_eval.py
(--kernel-tasks) times both kernels on real tasks: 4-5.5x in favour of this one.

The arithmetic is the torch path's, in float32, except that dot products and gradient sums are
added up in a different order (``reassoc``), as the torch path already differs from the
one-model-at-a-time reference. Tests compare all three.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the torch path still works without it
    numba = None


def available() -> bool:
    """Whether the fused kernel can run here (numba importable)."""
    return numba is not None


def threads() -> int:
    """Threads the kernel spreads groups over."""
    return numba.get_num_threads() if numba is not None else 0


def _kernel(Xa, y, groups, rows, ntrain, P, M1, M2, wd, live, t,  # noqa: ANN001, N803
            batch_size, adam, lr, beta1, beta2, eps, alpha):
    """Train every (group, member) for ``rows.shape[1]`` passes; updates P, M1, M2 and t in place.

    Xa [n, D+1] f32 (ones column last); y [n] int64; groups [Ga] int64 indices into the state
    arrays; rows [Ga, passes, maxn] int64, the rows of each pass in mini-batch order; ntrain [Ga];
    P, M1, M2 [G, C, R, D+1] f32 (M2 unused for RMSprop); wd [G, R] f32; live [G, R] bool;
    t [G] f64, the optimiser step of each group.
    """
    C = P.shape[1]
    R = P.shape[2]
    Dp = P.shape[3]
    npass = rows.shape[1]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in numba.prange(groups.shape[0]):
        g = groups[j]
        n = ntrain[j]
        grad = np.zeros((C, R, Dp), dtype=np.float32)
        lg = np.zeros((C, 4), dtype=np.float32)  # logits, then loss gradients, of one block of rows
        rr = np.zeros(batch_size + 4, dtype=np.int64)  # the mini-batch's rows, padded to whole blocks
        for p in range(npass):
            for start in range(0, n, batch_size):
                bsz = min(batch_size, n - start)
                inv = one / np.float32(bsz)
                # Rows go in blocks of 4: four independent accumulators per weight vector keep
                # the FMA units busy (one dot product at a time is bound by the add latency).
                # A short last block repeats the last row; its gradient weight is 0.
                for b in range(bsz + 3 - (bsz + 3) % 4):
                    rr[b] = rows[j, p, start + min(b, bsz - 1)]
                grad[:] = zero
                for b0 in range(0, bsz, 4):
                    x0, x1, x2, x3 = Xa[rr[b0]], Xa[rr[b0 + 1]], Xa[rr[b0 + 2]], Xa[rr[b0 + 3]]
                    for r in range(R):
                        if not live[g, r]:
                            continue
                        for c in range(C):
                            w = P[g, c, r]
                            s0 = zero
                            s1 = zero
                            s2 = zero
                            s3 = zero
                            for k in range(Dp):
                                wk = w[k]
                                s0 += wk * x0[k]
                                s1 += wk * x1[k]
                                s2 += wk * x2[k]
                                s3 += wk * x3[k]
                            lg[c, 0] = s0
                            lg[c, 1] = s1
                            lg[c, 2] = s2
                            lg[c, 3] = s3
                        # d(mean CE)/d(logit) = (softmax - onehot) / bsz; 0 for the padding rows
                        for q in range(4):
                            if b0 + q >= bsz:
                                for c in range(C):
                                    lg[c, q] = zero
                                continue
                            mx = lg[0, q]
                            for c in range(1, C):
                                mx = max(mx, lg[c, q])
                            tot = zero
                            for c in range(C):
                                e = np.exp(lg[c, q] - mx)
                                lg[c, q] = e
                                tot += e
                            label = y[rr[b0 + q]]
                            for c in range(C):
                                coef = lg[c, q] / tot
                                if c == label:
                                    coef -= one
                                lg[c, q] = coef * inv
                        # the gradient, while the block's rows are still in L1
                        for c in range(C):
                            c0 = lg[c, 0]
                            c1 = lg[c, 1]
                            c2 = lg[c, 2]
                            c3 = lg[c, 3]
                            gr = grad[c, r]
                            for k in range(Dp):
                                gr[k] += c0 * x0[k] + c1 * x1[k] + c2 * x2[k] + c3 * x3[k]
                t[g] += 1.0
                if adam:
                    bc1 = 1.0 - beta1 ** t[g]
                    step = np.float32(lr / bc1)
                    bc2_sqrt = np.float32(np.sqrt(1.0 - beta2 ** t[g]))
                    one_b1 = np.float32(1.0 - beta1)
                    b2 = np.float32(beta2)
                    one_b2 = np.float32(1.0 - beta2)
                else:
                    step = np.float32(lr)
                a32 = np.float32(alpha)
                eps32 = np.float32(eps)
                for r in range(R):
                    if not live[g, r]:
                        continue
                    l2 = wd[g, r]
                    for c in range(C):
                        w = P[g, c, r]
                        m1 = M1[g, c, r]
                        gr = grad[c, r]
                        if adam:
                            m2 = M2[g, c, r]
                            for k in range(Dp):
                                gk = gr[k] + l2 * w[k]
                                m1[k] += one_b1 * (gk - m1[k])
                                m2[k] = m2[k] * b2 + one_b2 * gk * gk
                                w[k] -= step * (m1[k] / (np.sqrt(m2[k]) / bc2_sqrt + eps32))
                        else:
                            for k in range(Dp):
                                gk = gr[k] + l2 * w[k]
                                m1[k] = m1[k] * a32 + (one - a32) * gk * gk
                                w[k] -= step * (gk / (np.sqrt(m1[k]) + eps32))


_compiled = None


def train_passes(Xa: np.ndarray, y: np.ndarray, groups: np.ndarray, rows: np.ndarray, ntrain: np.ndarray,
                 P: np.ndarray, M1: np.ndarray, M2: np.ndarray | None, wd: np.ndarray, live: np.ndarray,
                 t: np.ndarray, batch_size: int, optim: str, hyper: dict[str, float]) -> None:
    """Run the fused kernel (compiled on first use, cached on disk); arrays are updated in place."""
    global _compiled
    if numba is None:  # pragma: no cover
        raise RuntimeError("the fused classifier kernel needs numba: pip install numba")
    if optim not in ("adam", "rmsprop"):
        raise ValueError(f"unsupported optimizer {optim!r} (adam or rmsprop)")
    if _compiled is None:
        # Reassociation lets LLVM vectorise the dot products; contract allows FMAs.
        _compiled = numba.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})(_kernel)
    adam = optim == "adam"
    _compiled(Xa, y, groups, rows, ntrain, P, M1, M2 if M2 is not None else M1, wd, live, t, int(batch_size),
              adam, float(hyper.get("lr", 0.0)), float(hyper.get("beta1", 0.0)), float(hyper.get("beta2", 0.0)),
              float(hyper["eps"]), float(hyper.get("alpha", 0.0)))
