"""Corrections of a mistyped word as completion items (the daemon's candidates of kind
"correction", docs/protocol.md): an item that replaces the typed word, labelled as one."""

from __future__ import annotations

from typing import Any

from lsprotocol import types as lsp
from pygls.workspace import TextDocument

from wordahead.predict.shown import score_label


def corrections(prediction: dict[str, Any]) -> list[dict[str, Any]]:
    """The corrections of the typed word among the candidates (docs/protocol.md)."""
    return [
        c
        for c in prediction.get("candidates") or []
        if c.get("kind") == "correction" and isinstance(c.get("replaces"), int)
    ]


def correction_item(
    doc: TextDocument,
    position: lsp.Position,
    context: str,
    cand: dict[str, Any],
    rank: int,
    command: lsp.Command,
) -> lsp.CompletionItem:
    """A completion item that replaces the mistyped word before the cursor (the `replaces`
    characters of `context`) with the correction, labelled as one. Its filter text is what was
    typed, so an editor that filters items by the typed word keeps it."""
    typed = context[len(context) - min(cand["replaces"], len(context)) :]
    units = doc.position_codec.client_num_units(typed)
    start = lsp.Position(position.line, max(0, position.character - units))
    word = cand["word"]
    return lsp.CompletionItem(
        label=word,
        label_details=lsp.CompletionItemLabelDetails(description="correction"),
        kind=lsp.CompletionItemKind.Text,
        detail=f"correction of {typed!r} {score_label(cand.get('score', 0.0))} keyboard".replace(
            "  ", " "
        ),
        sort_text=f"{rank:03d}",
        filter_text=typed,
        preselect=rank == 0,
        text_edit=lsp.TextEdit(range=lsp.Range(start=start, end=position), new_text=word),
        command=command,
    )
