"""The privacy a federation spends: epsilon of the (subsampled) Gaussian mechanism over rounds,
by RDP."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

DELTA = 1e-6  # what the README and the server report epsilon at

# Renyi orders searched for the tightest conversion (dense where the optimum usually is).
ORDERS = tuple(
    [1 + x / 100 for x in range(1, 100)]
    + [2 + x / 10 for x in range(0, 180)]
    + list(range(20, 4097))
)
# Subsampled rounds: the RDP bound below is for integer orders (a sum over k <= alpha).
INTEGER_ORDERS = tuple(list(range(2, 129)) + [160, 192, 256, 384, 512, 768, 1024])


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float = DELTA) -> float:
    """Epsilon after `rounds` releases of a sum of per-client updates clipped to norm C with
    Gaussian noise of standard deviation `noise_multiplier` * C, every client in every round."""
    return epsilon([(noise_multiplier, 1.0)] * rounds, delta)


def epsilon(releases: Sequence[tuple[float, float]], delta: float = DELTA) -> float:
    """Epsilon at `delta` after the releases (noise multiplier z, sample rate q), in any order.

    Client-level, add-or-remove-one neighbours. A round with q = 1 asks every available client
    and is (alpha, alpha / (2 z^2))-RDP; a round with q < 1 asks each client independently with
    probability q (Poisson sampling, kept secret by the server, which also adds the noise) and
    gets the subsampled Gaussian's bound for integer orders (Mironov, Talwar and Zhang 2019, as
    in Google's dp-accounting and Opacus). Rounds add up; the conversion to (epsilon, delta) is
    the one of Canonne, Kamath and Steinke (2020). Infinite if any round had no noise.
    """
    if not releases:
        return 0.0
    if any(z <= 0 for z, _ in releases):
        return math.inf
    sampled = any(q < 1 for _, q in releases)
    counts = Counter(releases)  # rounds alike cost alike: one bound each, times their number
    best = math.inf
    for alpha in INTEGER_ORDERS if sampled else ORDERS:
        rdp = sum(n * _rdp(z, q, alpha) for (z, q), n in counts.items())
        eps = (
            rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )
        best = min(best, eps)
    return max(0.0, best)


def _rdp(z: float, q: float, alpha: float) -> float:
    """RDP of order `alpha` of one round: the Gaussian mechanism at noise multiplier z, on a
    Poisson sample of rate q."""
    if q >= 1:
        return alpha / (2 * z**2)
    if q <= 0:
        return 0.0
    a = int(alpha)
    terms = [
        math.lgamma(a + 1)
        - math.lgamma(k + 1)
        - math.lgamma(a - k + 1)
        + (a - k) * math.log1p(-q)
        + k * math.log(q)
        + (k * k - k) / (2 * z**2)
        for k in range(a + 1)
    ]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)
