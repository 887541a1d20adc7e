"""What a client shows for the word being typed: words only, none it showed there before, and
how likely each is."""

from __future__ import annotations

from dataclasses import dataclass, field

from wordahead.types import MAX_PUNCT


@dataclass
class ShownInWord:
    """Suggestions shown while one word is typed. A suggestion the user typed past (it was
    shown, and they typed another character instead of accepting it) is not shown again in
    that word, so the places go to new candidates: the client asks for as many more as it
    hides (`ask`) and drops them (`show`). Asking again at the same point shows the same.
    Punctuation candidates (at a word start) are not shown either: accepting one saves no
    keystroke, so the client asks for that many more words instead."""

    word: object = None  # what identifies the word: the text before it, say
    typed: str | None = None  # the part of the word typed at the last `show`
    passed: set[str] = field(default_factory=set)  # shown at earlier points of the word
    current: list[str] = field(default_factory=list)  # shown at the last point

    def ask(self, word: object, typed: str, k: int, limit: int) -> int:
        """How many suggestions to ask for to show `k` after `typed` (at most `limit`)."""
        if word != self.word or self.typed is None or not typed.startswith(self.typed):
            self.word, self.passed, self.current = word, set(), []
        elif typed != self.typed:  # typed on: what was shown was passed over
            self.passed.update(self.current)
            self.current = []
        self.typed = typed
        extra = MAX_PUNCT if not typed else 0
        return min(limit, k + extra + sum(w.startswith(typed) for w in self.passed))

    def show(self, words: list[str], k: int) -> list[str]:
        """The first `k` of `words` (the word candidates, most likely first) that were not
        passed over."""
        self.current = [w for w in words if w not in self.passed][:k]
        return self.current


def score_label(score: float) -> str:
    """A candidate's probability for a person ("12%"); "" when it rounds to nothing (a word
    the model only completes, or one too unlikely to put a number on)."""
    return f"{score:.0%}" if score >= 0.005 else ""
