"""predict.sources: what besides the model decides a suggestion, behind the seam in `base`."""

# `assemble` below is where the served sources are made: adding a source is its own module
# (see `base`) and one line here.

from __future__ import annotations

from wordahead.predict.lexicon import Lexicon
from wordahead.predict.sources.base import SuggestionSource
from wordahead.predict.sources.typos import TypoCorrection


def assemble(
    phrases: SuggestionSource | None,
    lexicon: Lexicon | None,
    typos: TypoCorrection | None = None,
) -> tuple[SuggestionSource, ...]:
    """The sources served with an adapter, in the order they see the drafts: the user's
    `phrases` (a PhraseModel or LivePhrases; None: phrases are off), then typo correction
    (`typos`, None: off; last, so its corrections are weighed against the blended words).
    `lexicon` is the model's (None: it ships none), for sources that need its words."""
    sources: list[SuggestionSource] = []
    if phrases is not None:
        sources.append(phrases)
    if typos is not None and lexicon is not None:
        sources.append(typos.source(phrases))
    return tuple(sources)
