"""The typo model: what a slip of the finger costs, and the real-word prefixes a typed part of a
word may have been meant as.

Costs are negative natural logs of how likely a slip is (so a cost of 4.6 is about 1 in 100),
and they add up over the slips of a word. The kinds, as a typist makes them:

- substitution: a key other than the one meant; cheaper when the two are neighbours on the
  keyboard (wordahead.predict.layouts);
- omission: a letter left out (cheaper when it is one of a double letter: "ocur");
- insertion: a stray key pressed as well (cheaper when it is next to the key before or after
  it); doubling: a key pressed twice ("thhe");
- transposition: two letters swapped ("teh").

`near_prefixes` is an error-tolerant prefix search (Chaudhuri & Kaushik, SIGMOD 2009): a walk
down the trie of real words (`Spellings.next_letters`) along the typed letters, branching on the
slips while their cost stays within the limit, and cut as soon as no real word starts with the
spelling built. The first letter is rarely the slip (people look at the start of a word), so a
slip there costs more.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wordahead.predict.layouts import Layout


class Spellings(Protocol):
    """Real words, asked about by prefix (wordahead.predict.lexicon.Lexicon is one)."""

    def has_prefix(self, part: str) -> bool: ...

    def next_letters(self, part: str) -> str: ...


@dataclass(frozen=True)
class SlipCosts:
    """What each kind of slip costs (negative natural log of its probability)."""

    near_substitution: float = 4.0
    far_substitution: float = 7.5
    omission: float = 4.5
    omitted_double: float = 4.0
    insertion: float = 6.5
    near_insertion: float = 4.5
    doubling: float = 4.0
    transposition: float = 4.0
    first_letter: float = 3.0  # added to a slip that changes the first letter
    max_slips: int = 2
    max_cost: float = 11.0


class _Union:
    """Several word sets seen as one (the lexicon and the user's own words)."""

    def __init__(self, sets: Sequence[Spellings]) -> None:
        self.sets = sets

    def has_prefix(self, part: str) -> bool:
        return any(s.has_prefix(part) for s in self.sets)

    def next_letters(self, part: str) -> str:
        if len(self.sets) == 1:
            return self.sets[0].next_letters(part)
        return "".join(dict.fromkeys("".join(s.next_letters(part) for s in self.sets)))


def near_prefixes(
    typed: str,
    words: Spellings | Sequence[Spellings],
    keys: Layout,
    costs: SlipCosts = SlipCosts(),
    limit: int = 16,
) -> dict[str, float]:
    """Real-word prefixes that `typed` (a part of a word) may have been meant as, with the cost
    of the slips that turn one into the other: {prefix: cost}, cheapest first, at most `limit`,
    `typed` itself left out. Lower-cased (the caller carries the typed capitals over)."""
    spell = _Union(words) if isinstance(words, Sequence) else words
    typed = typed.lower()
    n = len(typed)
    best: dict[tuple[int, str], float] = {}
    found: dict[str, float] = {}
    # Depth first: (letters of `typed` consumed, the spelling built, its cost, slips made).
    stack: list[tuple[int, str, float, int]] = [(0, "", 0.0, 0)]

    def push(i: int, built: str, cost: float, slips: int) -> None:
        if cost > costs.max_cost or best.get((i, built), cost + 1.0) <= cost:
            return
        best[(i, built)] = cost
        stack.append((i, built, cost, slips))

    while stack:
        i, built, cost, slips = stack.pop()
        if best.get((i, built), cost) < cost:
            continue  # reached more cheaply since it was pushed
        if i == n:
            if built != typed and cost < found.get(built, costs.max_cost + 1.0):
                found[built] = cost
            continue
        ch = typed[i]
        if spell.has_prefix(built + ch):
            push(i + 1, built + ch, cost, slips)
        if slips == costs.max_slips:
            continue
        extra = costs.first_letter if i == 0 else 0.0
        after = slips + 1
        for letter in spell.next_letters(built):
            if letter == ch or letter.isdigit():
                continue
            near = keys.near(ch, letter)
            swap = costs.near_substitution if near else costs.far_substitution
            push(i + 1, built + letter, cost + swap + extra, after)
            doubled = built.endswith(letter)
            omit = costs.omitted_double if doubled else costs.omission
            push(i, built + letter, cost + omit + extra, after)
        if i > 0:  # the first letter is never a stray key: a word starts where typing started
            push(i + 1, built, cost + _insertion(typed, i, keys, costs), after)
        if i + 1 < n and typed[i + 1] != ch:
            swapped = built + typed[i + 1] + ch
            if spell.has_prefix(swapped):
                push(i + 2, swapped, cost + costs.transposition + extra, after)
    ranked = sorted(found.items(), key=lambda item: (item[1], item[0]))
    return dict(ranked[:limit])


def _insertion(typed: str, i: int, keys: Layout, costs: SlipCosts) -> float:
    """The cost of `typed[i]` being a key pressed by mistake."""
    ch = typed[i]
    if typed[i - 1] == ch:
        return costs.doubling
    beside = typed[i - 1], typed[i + 1] if i + 1 < len(typed) else ""
    return costs.near_insertion if any(keys.near(ch, b) for b in beside if b) else costs.insertion


CHILDREN_MEMO = 1 << 15  # spellings whose next letters the one-slip walk remembers
# Walk states: (spelling built, slips made) -> cost.
_States = dict[tuple[str, int], float]


class OneSlip:
    """`near_prefixes` with at most one slip, typed letter by letter: the states of a typed part
    are made from those of the part one letter shorter (remembered), so each keystroke walks
    only the new letter's branches (about a hundred prefix checks) however long the word."""

    def __init__(
        self, words: Sequence[Spellings], keys: Layout, costs: SlipCosts, memo: int = 2048
    ) -> None:
        self.spell = _Union(words)
        self.keys = keys
        self.costs = costs
        self.memo = memo
        # typed part -> (states with all of it consumed, those plus one left-out letter)
        self._known: OrderedDict[str, tuple[_States, _States]] = OrderedDict()
        self._next: dict[str, str] = {}  # spelling -> the letters real words go on with

    def _letters(self, built: str) -> str:
        known = self._next.get(built)
        if known is None:
            if len(self._next) >= CHILDREN_MEMO:
                self._next.clear()
            known = self._next[built] = self.spell.next_letters(built)
        return known

    def words_changed(self) -> None:
        """The word sets learned words: forget the walks made over the old ones."""
        self._known.clear()
        self._next.clear()

    def near(self, typed: str, limit: int = 16) -> dict[str, float]:
        """As `near_prefixes(typed, ..., max_slips=1)`: {real-word prefix: slip cost}."""
        typed = typed.lower()
        done, _ = self._states(typed)
        found: dict[str, float] = {}
        for (built, _), cost in done.items():
            if built != typed and cost < found.get(built, self.costs.max_cost + 1.0):
                found[built] = cost
        ranked = sorted(found.items(), key=lambda item: (item[1], item[0]))
        return dict(ranked[:limit])

    def _states(self, typed: str) -> tuple[_States, _States]:
        hit = self._known.get(typed)
        if hit is not None:
            self._known.move_to_end(typed)
            return hit
        if not typed:
            out: tuple[_States, _States] = ({("", 0): 0.0}, self._omitted({("", 0): 0.0}, 0))
        else:
            out = self._extend(typed)
        self._known[typed] = out
        if len(self._known) > self.memo:
            self._known.popitem(last=False)
        return out

    def _extend(self, typed: str) -> tuple[_States, _States]:
        c, i = typed[-1], len(typed) - 1
        costs, letters = self.costs, self._letters
        extra = costs.first_letter if i == 0 else 0.0
        done: _States = {}

        def add(built: str, slips: int, cost: float) -> None:
            if cost <= costs.max_cost and cost < done.get((built, slips), cost + 1.0):
                done[built, slips] = cost

        before, omitted = self._states(typed[:-1])
        for states in (before, omitted):
            for (built, slips), cost in states.items():
                after = letters(built)
                if c in after:
                    add(built + c, slips, cost)
                if slips:
                    continue
                for letter in after:
                    if letter != c and not letter.isdigit():
                        near = self.keys.near(c, letter)
                        swap = costs.near_substitution if near else costs.far_substitution
                        add(built + letter, 1, cost + swap + extra)
                if i > 0:  # the first letter is never a stray key
                    add(built, 1, cost + _insertion(typed, i, self.keys, costs))
        if i > 0 and typed[i - 1] != c:
            for (built, slips), cost in self._states(typed[:-2])[0].items():
                swapped = built + c + typed[i - 1]
                if not slips and c in letters(built) and typed[i - 1] in letters(built + c):
                    first = costs.first_letter if i == 1 else 0.0
                    add(swapped, 1, cost + costs.transposition + first)
        return done, self._omitted(done, len(typed))

    def _omitted(self, done: _States, i: int) -> _States:
        """The states with a letter the typist left out after what is consumed."""
        costs = self.costs
        extra = costs.first_letter if i == 0 else 0.0
        out: _States = {}
        for (built, slips), cost in done.items():
            if slips:
                continue
            for letter in self._letters(built):
                if letter.isdigit():
                    continue
                omit = costs.omitted_double if built.endswith(letter) else costs.omission
                if cost + omit + extra <= costs.max_cost:
                    out[built + letter, 1] = cost + omit + extra
        return out
