"""The key/value cache slots of an engine: the contexts of the clients typing at once, and the
next-token distributions already computed.

Prompt caching: the key/values of a slot's context are kept and only new tokens are run;
next-token distributions are kept by their absolute token sequence (typing on in a word reuses
those of the previous keystroke). The context is a deterministic window of the text (see
`wordahead.predict.query.model_window`), so results with and without the caches are the same
(up to float rounding of differently batched runs).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from wordahead.predict.tokens import Next

# Next-token distributions kept (a float32 vector of the vocabulary each, 32 kB for 8k tokens):
# typing on in a word asks for those of the last keystroke again.
HYPOTHESIS_CACHE_SIZE = 96  # at least
NEXTS_PER_SLOT = 24  # ... and this many per slot holding a client's context
# Key/value cache slots: clients typing at once that each keep their context (0.6 MB each).
SLOTS = 64
HOT_SLOTS = 2  # slots taken last that keep batch copies of their key/values (no tree graph)
SLOT_WAIT_S = 0.05  # how long a prediction waits for the busy slot holding its context
SLOT_KEEP_TAKES = 4 * SLOTS  # a slot not taken for this many predictions lets its key/values go


class _Nexts:
    """Next-token distributions by absolute token sequence, most recently used last; shared by
    every slot of an engine (a sequence's distribution is the same whoever asks)."""

    def __init__(self, size: int = HYPOTHESIS_CACHE_SIZE) -> None:
        self.size = size
        self.items: OrderedDict[tuple[int, ...], Next] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, seq: tuple[int, ...]) -> Next | None:
        with self.lock:
            hit = self.items.get(seq)
            if hit is not None:
                self.items.move_to_end(seq)
            return hit

    def put(self, seq: tuple[int, ...], nxt: Next) -> None:
        with self.lock:
            self.items[seq] = nxt
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class Slot:
    """One cache slot: the key/values of a base token sequence (one client's context), and
    the next-token distributions it reads and writes.

    Hypotheses after the base are scored by running only their tokens on top of the base's
    key/values; the base moves to each new context of whoever holds the slot.
    """

    def __init__(self, nexts: _Nexts | None = None) -> None:
        self.base: tuple[int, ...] = ()
        self.kv: list[np.ndarray] = []  # [1, kv_heads, len(base), head_dim] per past input
        self.repeated: list[np.ndarray] = []  # the same, repeated along the batch axis
        self.nexts = nexts if nexts is not None else _Nexts()
        self.busy = False
        self.used = 0  # when it was last taken (the slots' clock)
        self.stop: Callable[[], bool] | None = None  # asked before each run (work ahead)

    def get(self, seq: tuple[int, ...]) -> Next | None:
        return self.nexts.get(seq)

    def put(self, seq: tuple[int, ...], nxt: Next) -> None:
        self.nexts.put(seq, nxt)

    def holds(self, context: tuple[int, ...]) -> bool:
        """True when the key/values are those of `context`."""
        return bool(self.kv) and context == self.base


def common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (a binary search of slice comparisons, done
    in C: every prediction compares its context with every slot's)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Slots:
    """The cache slots of an engine. Each prediction takes the free slot whose context shares
    the most with its own (else the least recently used one) and has it alone until it is
    done, so several clients typing at once each keep their key/values and run in parallel,
    and a slot only ever serves tokens it computed for the context it holds."""

    def __init__(self, count: int) -> None:
        self.nexts = _Nexts()
        self.states = [Slot(self.nexts) for _ in range(max(1, count))]
        self.free = threading.Condition()
        self.clock = 0

    def take(self, context: tuple[int, ...]) -> Slot:
        # Sharing a token or two (the start of a text) is no reason to take someone's slot:
        # a slot counts only if it holds more than the first half of the context, which one
        # token and one slice comparison tell (most slots hold other clients' texts).
        least = len(context) // 2
        head = context[: least + 1]
        pivot = head[-1] if head else None
        deadline = time.monotonic() + SLOT_WAIT_S
        with self.free:
            while True:
                sharing = {
                    s: common_length(s.base, context)
                    for s in self.states
                    if len(s.base) > least
                    and s.base[least] == pivot
                    and s.base[: least + 1] == head
                }
                best = max(sharing, key=lambda s: (sharing[s], -s.used)) if sharing else None
                idle = [s for s in self.states if not s.busy]
                # The slot holding this context is busy (a prediction computed ahead for the
                # same client): waiting a moment for it beats recomputing the context.
                if idle and (best is None or not best.busy):
                    break
                left = deadline - time.monotonic()
                if idle and left <= 0:
                    break
                self.free.wait(left if idle else None)
            free = [s for s in sharing if not s.busy]
            if free:  # the one sharing the most (and of those, the least recently used)
                state = max(free, key=lambda s: (sharing[s], -s.used))
            else:  # the least recently used
                state = min(idle, key=lambda s: s.used)
            self.clock += 1
            state.busy, state.used = True, self.clock
            live = 0
            for other in self.states:
                if not other.busy and other.used <= self.clock - HOT_SLOTS:
                    # Batch copies of the key/values are large: only the slots taken last
                    # keep theirs. A context nobody asked about for a while (a window the
                    # text moved past, a client gone) is unlikely to come back: its memory goes.
                    other.repeated = []
                    if other.used < self.clock - SLOT_KEEP_TAKES:
                        other.base, other.kv = (), []
                live += bool(other.kv) or other is state
            # Distributions kept: enough for what each client typing now will ask again.
            self.nexts.size = max(HYPOTHESIS_CACHE_SIZE, NEXTS_PER_SLOT * live)
            return state

    def give_back(self, state: Slot) -> None:
        with self.free:
            state.busy = False
            self.free.notify()
