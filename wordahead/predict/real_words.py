"""The words the predictor may offer: the model's lexicon and the words its sources hold."""

from __future__ import annotations

from collections.abc import Sequence

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.sources.base import SuggestionSource, Vocabulary


class RealWords:
    """The model's lexicon and the vocabularies of the served sources (the user's own words)."""

    def __init__(self, lexicon: Lexicon, sources: Sequence[SuggestionSource] = ()) -> None:
        self.lexicon = lexicon
        self.sources = tuple(sources)
        self._vocabularies: tuple[Vocabulary, ...] = ()
        self.user_words_changed()

    def user_words_changed(self) -> None:
        """A source learned words: take its vocabulary (and its prefix snapshots) again."""
        self._vocabularies = tuple(
            v for v in (s.vocabulary() for s in self.sources) if v is not None
        )

    def is_word(self, word: str) -> bool:
        if word in self.lexicon:
            return True
        # The user's words keep their case: "zanzibar" and "ZANZIBAR" are their "Zanzibar".
        forms = (word, word.lower(), word.capitalize())
        return any(form in v for v in self._vocabularies for form in forms)

    def can_start(self, part: str) -> bool:
        """Whether some real word starts with `part`."""
        return self.lexicon.has_prefix(part) or any(v.has_prefix(part) for v in self._vocabularies)

    def accept(self, raw: bytes) -> bool:
        try:
            return self.is_word(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return False

    def viable(self, raw: bytes) -> bool:
        # A cut-off multi-byte character at the end may still become anything.
        return self.can_start(raw.decode("utf-8", errors="ignore"))
