"""Adapter swaps as the daemon makes them, in a process of their own: `python -m
tests.swap_memory MODEL PHRASES` prints RSS after 1 and 21 swaps as JSON.

A fresh interpreter, heaps capped at start like the daemon's, so the figures are the
predictor's and not those of whatever a test process did before.
"""

from __future__ import annotations

import gc
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wordahead import memory

TEXTS = (
    "Thank you so much for your help with the project. We are going to the beach this "
    "weekend if the weather is nice.\nDon't forget to water the plants, I'm away on holiday!",
    "I'm away on holiday. Could you please send me the report by Friday afternoon?",
)


def rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(model: Path, phrases: Path) -> dict[str, object]:
    memory.limit_arenas()
    from wordahead.predict.engine import Engine
    from wordahead.predict.predictor import Predictor
    from wordahead.predict.sources.live_phrases import LivePhrases
    from wordahead.predict.sources.phrases import PhraseModel

    # Predictions and the work ahead on two threads, swaps on a third, the phrases read from
    # their file at every swap, freed memory given back once the typing stops (idle).
    predictor = Predictor(model, threads=1)
    session = predictor._engine.session
    initial = predictor.artifacts.initial_adapter()
    rng = np.random.default_rng(0)
    adapters = [
        {n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in initial.items()}
        for _ in range(2)
    ]
    typists, swapper = ThreadPoolExecutor(2), ThreadPoolExecutor(1)

    def type_text(text: str) -> None:
        for end in range(10, len(text), 3):
            predictor.predict(text[:end], k=3)
            predictor.prefetch(text[:end], k=3)

    def swap(i: int) -> None:
        live = LivePhrases(PhraseModel.load(phrases))
        loaded = swapper.submit(predictor.load_adapter, adapters[i % 2], f"v{i}", live)
        typing = [typists.submit(type_text, t) for t in TEXTS]
        assert loaded.result()
        for done in typing:
            done.result()
        memory.trim(collect=False)

    swap(0)  # from the base model: the first predictions fill the caches and the heaps
    swap(1)
    after_one = rss_mb()
    for i in range(2, 22):
        swap(i)
    gc.collect()
    return {
        "rss_after_1_swap_mb": after_one,
        "rss_after_21_swaps_mb": rss_mb(),
        "version": predictor.adapter_version,
        "same_session": predictor._engine.session is session,
        "engines_alive": sum(isinstance(o, Engine) for o in gc.get_objects()),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
