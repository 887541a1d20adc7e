"""Small shared types that cross module boundaries (predictions, the error type)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

MAX_K = 20  # candidates one predict may ask for (the predictor's limit, and the wire's)
MAX_PUNCT = 4  # punctuation candidates an answer at a word start may hold (among the k)


@dataclass(frozen=True)
class Candidate:
    """One suggestion: a whole word (or a punctuation mark) and its probability. Fields a
    kind of its own needs are added with the default None, which `to_json` leaves out."""

    word: str
    score: float
    kind: str = "word"  # "word", "punct" or "correction" (of the typed part of the word)
    replaces: int | None = None  # a correction: how many characters before the cursor it replaces

    def to_json(self) -> dict[str, Any]:
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None}


@dataclass(frozen=True)
class Prediction:
    """What the predictor answers for the text before the cursor."""

    prefix: str  # the partial word being completed; "" at a word boundary
    candidates: list[Candidate]
    adapter: str  # adapter version in use ("base" when none)
    latency_ms: float = 0.0
    # Suggestions offered beside the candidates, not among them (a phrase as ghost text).
    beside: list[Candidate] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        return [c.word for c in self.candidates]

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "candidates": [c.to_json() for c in self.candidates],
            "adapter": self.adapter,
            "latency_ms": round(self.latency_ms, 3),
            **({"beside": [c.to_json() for c in self.beside]} if self.beside else {}),
        }


class KeyboardError(Exception):
    """An error with a message a person can act on."""
