"""The model's likeliest words that start with any of several spellings, each weighted.

The typo source asks the language model "which words complete `recei` or `recid` or `revie`,
and how likely is each here?" in one search: it is `search_words` (wordahead.predict.search)
with a hypothesis per spelling, whose score starts at the spelling's weight (the chance of the
slips that turn it into what was typed). The spellings share the beam and the session runs, so
asking about eight of them costs about what asking about one does; and `floor` (the k-th best
word found without correction) prunes every hypothesis that cannot beat it, so a typed word
the model already completes well costs no session run at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from wordahead.predict.real_words import RealWords
from wordahead.predict.search import (
    BEAM_WIDTH,
    MAX_DEPTH,
    MAX_WORD_TOKENS,
    Evaluate,
    _can_end,
    _Hyp,
    _next_tokens,
)
from wordahead.predict.tokens import Next, TokenTable
from wordahead.predict.words import WORD_RE


@dataclass(frozen=True)
class _Spelt:
    hyp: _Hyp
    prefix: bytes


def near_words_decoded(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    spellings: dict[str, float],
    k: int,
    real: RealWords | None,
    floor: float,
) -> dict[str, float]:
    """`search_near_words` for {spelling: weight} as text: {word: weighted probability}."""
    prefixes = {s.encode("utf-8"): w for s, w in spellings.items() if s}
    if not prefixes:
        return {}
    longest = max(len(p) for p in prefixes)
    depth = min(MAX_DEPTH, MAX_WORD_TOKENS + (longest + 1) // 2)
    beam = max(BEAM_WIDTH, k)
    near = search_near_words(table, root, evaluate, lead, prefixes, k, depth, beam, real, floor)
    words: dict[str, float] = {}
    for raw, (score, _) in near.items():
        try:
            word = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a multi-byte character cut off by the depth limit
        if WORD_RE.fullmatch(word):
            words[word] = score
    return words


def search_near_words(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefixes: dict[bytes, float],
    k: int,
    max_depth: int,
    beam: int,
    real: RealWords | None = None,
    floor: float = 0.0,
) -> dict[bytes, tuple[float, bytes]]:
    """{word: (weight * P(word | context), the spelling it completes)} for the likeliest
    words that start with one of `prefixes` ({spelling: weight}), each scoring above `floor`.
    A word two spellings reach keeps its best."""
    finished: dict[tuple[bytes, bytes], float] = {}
    best: dict[bytes, float] = {}

    def finish(word: bytes, prefix: bytes, score: float) -> None:
        total = finished[word, prefix] = finished.get((word, prefix), 0.0) + score
        best[word] = max(best.get(word, 0.0), total)

    def can_finish(word: bytes, prefix: bytes) -> bool:
        return len(word) >= len(prefix) and _can_end(word) and (real is None or real.accept(word))

    def kth_best() -> float:
        if len(best) < k:
            return max(floor, max(best.values(), default=0.0) * 1e-3)
        return max(floor, sorted(best.values(), reverse=True)[k - 1])

    level = [_Spelt(_Hyp((), b"", weight), prefix) for prefix, weight in prefixes.items()]
    nexts = [root] * len(level)
    for _ in range(max_depth):
        expansions: list[tuple[float, _Spelt, int]] = []
        bound = kth_best()
        for s, nxt in zip(level, nexts, strict=True):
            h = s.hyp
            if h.score <= bound:
                continue
            ids, ps = _next_tokens(table, h, nxt, lead, s.prefix, beam, bound / h.score)
            scores = (ps * h.score).tolist()
            expansions.extend(zip(scores, [s] * len(scores), ids.tolist(), strict=True))
        expansions.sort(key=lambda e: -e[0])
        grown: list[_Spelt] = []
        for score, s, t in expansions:
            if score <= bound or len(grown) == beam:
                break
            raw = table.bytes[t]
            body = raw[1:] if table.spaced[t] else raw
            word = s.hyp.word + body[: table.word_len[t]]
            if table.terminal[t]:
                if can_finish(word, s.prefix):
                    finish(word, s.prefix, score)
                    bound = kth_best()
            elif real is None or real.viable(word):
                grown.append(_Spelt(_Hyp((*s.hyp.tokens, t), word, score), s.prefix))
        if not grown:
            break
        level, nexts = grown, evaluate([s.hyp.tokens for s in grown])
        for s, nxt in zip(level, nexts, strict=True):
            if can_finish(s.hyp.word, s.prefix):
                finish(s.hyp.word, s.prefix, s.hyp.score * nxt.end)
    out: dict[bytes, tuple[float, bytes]] = {}
    for (word, prefix), score in finished.items():
        if score > floor and score >= out.get(word, (0.0, b""))[0]:
            out[word] = (score, prefix)
    return out
