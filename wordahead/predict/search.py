"""The word search: the most probable whole words after a context, by a beam search over tokens.

- at a word boundary, words that come next; inside a word, completions of the typed part (the
  prefix). The search is constrained to tokens whose bytes agree with the prefix, so a prefix
  that tokenizes differently from the finished word (" holi" = Ġh o l i, " holiday" = Ġh o l
  iday) is handled. A capitalised prefix keeps its capitals.
- a word is finished when the token after it is not a word continuation (space, punctuation,
  newline, end of text): its score is P(its tokens) * P(a boundary next), summed over the
  tokenizations that spell it. Hypotheses that cannot beat the k-th finished word are pruned.
  The hypotheses of one depth share one batched session run on the context's key/value cache
  (the `Evaluate` the engine gives).
- real words only: with `RealWords` (the model ships a lexicon), a word is offered only if the
  lexicon or a source's vocabulary holds it; the search goes on past spellings that are not
  words ("tomore"), so they never take the place of one that is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from wordahead.predict.real_words import RealWords
from wordahead.predict.tokens import Next, TokenTable, incomplete
from wordahead.predict.words import WORD_RE

BEAM_WIDTH = 8  # hypotheses scored per depth (at least k)
MAX_WORD_TOKENS = 4  # tokens a word may take beyond those its typed prefix needs
MAX_DEPTH = 12  # hard limit on search depth (long odd prefixes)
MIN_SHARE = 1e-3  # a word this much less likely than the best one found is not worth a search


@dataclass(frozen=True)
class _Hyp:
    tokens: tuple[int, ...]
    word: bytes  # the word so far (without the lead space)
    score: float  # P(tokens | context)


Evaluate = Callable[[list[tuple[int, ...]]], list[Next]]  # token tuples after the context


def search_words(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: bytes,
    k: int,
    max_depth: int,
    beam: int,
    real: RealWords | None = None,
    exact: bool = False,
) -> dict[bytes, float]:
    """The most probable whole words that start with `prefix`, as {word bytes: probability}
    (`exact`: the word `prefix` alone).

    Level by level: every hypothesis of the frontier has its next-token distribution; a
    hypothesis that spells a word (all of the prefix, not ending in a hyphen, and a real word
    when `real` is given) finishes with P(boundary next); its continuations compete for `beam`
    places, and any whose probability cannot beat the k-th finished word is dropped (its words
    can only be less probable), as is any that no real word starts with.
    """
    finished: dict[bytes, float] = {}

    def can_finish(word: bytes) -> bool:
        spelled = len(word) == len(prefix) if exact else len(word) >= len(prefix)
        return spelled and _can_end(word) and (real is None or real.accept(word))

    def kth_best() -> float:
        if len(finished) < k or exact:
            # Fewer than k words yet (a prefix few real words start with): still prune what
            # cannot come within MIN_SHARE of the best, or the search runs to its depth limit.
            # One word asked: each tokenization adds to its one score, so prune only those.
            return max(finished.values(), default=0.0) * MIN_SHARE
        return sorted(finished.values(), reverse=True)[k - 1]

    hyps, nexts = [_Hyp((), b"", 1.0)], [root]
    for _ in range(max_depth):
        expansions: list[tuple[float, _Hyp, int]] = []
        floor = kth_best()
        for h, nxt in zip(hyps, nexts, strict=True):
            if h.score <= floor or (exact and len(h.word) >= len(prefix)):
                continue  # none of its words can make the top k (or be the word asked)
            ids, ps = _next_tokens(table, h, nxt, lead, prefix, beam, floor / h.score)
            scores = (ps * h.score).tolist()
            expansions.extend(zip(scores, [h] * len(scores), ids.tolist(), strict=True))
        expansions.sort(key=lambda e: -e[0])
        grown: list[_Hyp] = []
        for score, h, t in expansions:
            if score <= floor or len(grown) == beam:
                break
            raw = table.bytes[t]
            body = raw[1:] if table.spaced[t] else raw
            word = h.word + body[: table.word_len[t]]
            if table.terminal[t]:  # the token itself ends the word ("ing.")
                if can_finish(word):
                    finished[word] = finished.get(word, 0.0) + score
                    floor = kth_best()
            elif (not exact or len(word) <= len(prefix)) and (real is None or real.viable(word)):
                grown.append(_Hyp((*h.tokens, t), word, score))
        if not grown:
            break
        # One session run for all of them: its cost is mostly reading the weights, so rows are
        # cheap and runs are not.
        hyps, nexts = grown, evaluate([h.tokens for h in grown])
        for h, nxt in zip(hyps, nexts, strict=True):
            if can_finish(h.word):
                finished[h.word] = finished.get(h.word, 0.0) + h.score * nxt.end
    return finished


def _can_end(word: bytes) -> bool:
    return bool(word) and not word.endswith(b"-") and not incomplete(word)


def _next_tokens(
    table: TokenTable, h: _Hyp, nxt: Next, lead: bytes, prefix: bytes, beam: int, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The tokens that may follow hypothesis `h`, with their probabilities: the `beam`
    likeliest once the prefix is spelled out, else those that agree with the rest of it.
    Tokens less probable than `floor` cannot make a word that makes the top k."""
    needs_lead = bool(lead) and not h.tokens
    if needs_lead:
        name, mask = "first_spaced", table.first_spaced
    elif not h.word:
        name, mask = "first_plain", table.first_plain
    elif incomplete(h.word):
        name, mask = "finish_char", table.finish_char
    elif h.word.endswith(b"-"):
        name, mask = "after_hyphen", table.after_hyphen
    else:
        name, mask = "cont", table.cont
    extra: list[int] = []
    if needs_lead and table.space_id is not None:
        extra.append(table.space_id)  # a bare space token, then the word (" " + "zanzibar")
    rest = prefix[len(h.word) :]
    if not rest and floor > 0 and not extra:
        # One pass over the vocabulary: usually only a handful of tokens are that likely.
        ids = np.flatnonzero(nxt.probs > floor)
        ids = ids[mask[ids]]
        ps = nxt.probs[ids]
        if len(ids) > beam:
            keep = np.argpartition(ps, -beam)[-beam:]
            ids, ps = ids[keep], ps[keep]
        return ids, ps
    if not rest:
        ids, ps = nxt.top(name, mask, beam)
        if not extra:
            return ids, ps
    else:
        # Tokens holding all of `key` (and maybe more of the word), or a part of it.
        key = (lead if needs_lead else b"") + rest
        ids = table.starting_with(key)
        ids = ids[mask[ids] & (table.word_len[ids] >= len(rest))]
        start = len(key) - len(rest)
        for j in range(start + 1, len(key)):
            t = table.exact.get(key[:j])
            if t is not None and mask[t] and table.word_len[t] == j - start:
                extra.append(t)
    if extra:
        ids = np.concatenate([ids, np.array(extra, dtype=np.int64)])
    ps = nxt.probs[ids]
    if len(ids) > 2 * beam:  # a short prefix agrees with hundreds of tokens: keep the likeliest
        keep = np.argpartition(ps, -2 * beam)[-2 * beam :]
        ids, ps = ids[keep], ps[keep]
    return ids, ps


def word_depth(raw_prefix: bytes) -> int:
    # Room for the prefix (a token spells two bytes or more, but for odd text) and the rest.
    return min(MAX_DEPTH, MAX_WORD_TOKENS + (len(raw_prefix) + 1) // 2)


def _search_decoded(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: str,
    k: int,
    real: RealWords | None,
) -> dict[str, float]:
    raw_prefix = prefix.encode("utf-8")
    beam = max(BEAM_WIDTH, k)
    raw = search_words(
        table, root, evaluate, lead, raw_prefix, k, word_depth(raw_prefix), beam, real
    )
    words: dict[str, float] = {}
    for word_bytes, p in raw.items():
        try:
            word = word_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a multi-byte character cut off by the depth limit
        if p > 0 and WORD_RE.fullmatch(word) and word.startswith(prefix):
            words[word] = words.get(word, 0.0) + p
    return words


def find_words(
    table: TokenTable,
    root: Next,
    evaluate: Evaluate,
    lead: bytes,
    prefix: str,
    k: int,
    real: RealWords | None = None,
    wanted: int = 0,
) -> dict[str, float]:
    """The most probable whole words starting with `prefix` (at least k, `wanted` if more),
    with their probabilities. A capitalised prefix keeps its capitals."""
    found = _search_decoded(table, root, evaluate, lead, prefix, max(k, wanted), real)
    if len(found) < k and prefix != prefix.lower():
        # A capitalised prefix the model rarely saw capitalised ("THAN", "Xylo"): complete
        # its lower-case form and carry the typed capitals over.
        lower = prefix.lower()
        shout = len(prefix) > 1 and prefix.isupper()
        for word, p in _search_decoded(table, root, evaluate, lead, lower, k, real).items():
            tail = word[len(lower) :]
            cased = prefix + (tail.upper() if shout else tail)
            if WORD_RE.fullmatch(cased) and cased not in found:
                found[cased] = p
    return found
