"""The privacy a federation spends: epsilon of the Gaussian mechanism over rounds, by RDP."""

from __future__ import annotations

import math

DELTA = 1e-6  # what the README and the server report epsilon at

# Renyi orders searched for the tightest conversion (dense where the optimum usually is).
ORDERS = tuple(
    [1 + x / 100 for x in range(1, 100)]
    + [2 + x / 10 for x in range(0, 180)]
    + list(range(20, 4097))
)


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float = DELTA) -> float:
    """Epsilon after `rounds` releases of a sum of per-client updates clipped to norm C with
    Gaussian noise of standard deviation `noise_multiplier` * C, at `delta`.

    Client-level, add-or-remove-one neighbours, every available client in every round (no
    credit for sampling): the accounting Flower's fixed-clipping wrappers assume. Each round
    is (alpha, alpha / (2 z^2))-RDP; rounds add up; the conversion to (epsilon, delta) is
    the one of Canonne, Kamath and Steinke (2020), as in Google's dp-accounting.
    Infinite without noise.
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    best = math.inf
    for alpha in ORDERS:
        rdp = rounds * alpha / (2 * noise_multiplier**2)
        eps = (
            rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        )
        best = min(best, eps)
    return max(0.0, best)
