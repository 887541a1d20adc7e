"""How the server moves the community adapter by a round's (noised) mean update: FedAvg,
FedAvgM or FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization").

The optimizer sees only what the DP mechanism released (the mean of the clipped updates
plus Gaussian noise), so whatever it does is post-processing and epsilon is unchanged.
That is why it runs here, after Flower's DP wrapper, and not as the wrapper's inner
strategy: the wrapper adds its noise to whatever the inner strategy returns, and noise
calibrated to the mean's sensitivity (C / n) says nothing about an Adam step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("fedavg", "fedavgm", "fedadam")


@dataclass
class ServerOptimizer:
    """Pseudo-gradient descent on the community adapter, one step per round.

    `delta` = released mean - current adapter. fedavg: x += lr * delta (lr 1: the mean).
    fedavgm: v = momentum * v + delta; x += lr * v. fedadam: Adam on delta with bias
    correction (beta1 = momentum, beta2, tau the adaptivity floor). `frozen[i]`: tensor i is
    not trained by this federation; it keeps its value (its released noise is dropped).
    The state lives for one run (the server process); a new run starts it again.
    """

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    steps: int = 0
    _m: list[np.ndarray] = field(default_factory=list, repr=False)
    _v: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(
                f"server-optimizer must be one of {', '.join(KINDS)}, not {self.kind!r}"
            )
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("server-lr must be > 0, server-momentum and server-beta2 in [0, 1)")
        if not self.tau > 0:
            raise ValueError("server-tau must be > 0")

    def step(
        self,
        current: Sequence[np.ndarray],
        released: Sequence[np.ndarray],
        frozen: Sequence[bool] = (),
    ) -> list[np.ndarray]:
        """The new adapter (float32) after one round whose released mean is `released`."""
        keep = list(frozen) or [False] * len(current)
        if not len(current) == len(released) == len(keep):
            raise ValueError("current, released and frozen differ in length")
        x = [np.asarray(a, dtype=np.float64) for a in current]
        delta = [
            np.zeros_like(c) if k else np.asarray(r, dtype=np.float64) - c
            for c, r, k in zip(x, released, keep)
        ]
        self.steps += 1
        if self.kind == "fedavg":
            moves = [self.lr * d for d in delta]
        elif self.kind == "fedavgm":
            self._m = [self.momentum * m + d for m, d in zip(self._m or _zeros(delta), delta)]
            moves = [self.lr * m for m in self._m]
        else:
            b1, b2, t = self.momentum, self.beta2, self.steps
            self._m = [b1 * m + (1 - b1) * d for m, d in zip(self._m or _zeros(delta), delta)]
            self._v = [b2 * v + (1 - b2) * d * d for v, d in zip(self._v or _zeros(delta), delta)]
            rate = self.lr * np.sqrt(1 - b2**t) / (1 - b1**t)
            moves = [
                np.zeros_like(m) if k else rate * m / (np.sqrt(v) + self.tau)
                for m, v, k in zip(self._m, self._v, keep)
            ]
        return [(c + mv).astype(np.float32) for c, mv in zip(x, moves)]


def _zeros(like: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros_like(a) for a in like]
