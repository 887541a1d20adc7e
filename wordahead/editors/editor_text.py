"""What an editor buffer means for prediction: file kinds, the context before the cursor, typed text."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# Language ids (LSP `languageId`, Neovim 'filetype', Emacs/Helix names) whose whole text is prose.
PROSE_LANGUAGES = frozenset(
    {
        "text",
        "plaintext",
        "txt",
        "markdown",
        "md",
        "rst",
        "restructuredtext",
        "org",
        "asciidoc",
        "mail",
        "tex",
        "latex",
        "gitcommit",
        "git-commit",
        "git_commit",
        "hgcommit",
        "jjdescription",
    }
)
# Commit messages: lines starting with "#" are the tool's own template, not the user's text.
COMMIT_LANGUAGES = frozenset({"gitcommit", "git-commit", "git_commit", "hgcommit"})

# Code: only line comments are predicted and observed (block comments and docstrings are not:
# telling them from code needs a parser, and a wrong guess would feed code to the model).
LINE_COMMENTS: dict[str, str] = {
    **dict.fromkeys(
        "python sh bash zsh fish ruby perl r yaml toml make makefile dockerfile cmake conf "
        "nix elixir julia powershell ps1 awk tcl crystal nim coffeescript gdscript".split(),
        "#",
    ),
    **dict.fromkeys(
        "c cpp objc objcpp cuda cs csharp java javascript javascriptreact typescript "
        "typescriptreact go rust swift kotlin scala dart php zig jsonc proto groovy "
        "verilog solidity glsl hlsl d odin v".split(),
        "//",
    ),
    **dict.fromkeys("lua sql haskell elm ada purescript agda vhdl".split(), "--"),
    **dict.fromkeys("lisp clojure scheme racket elisp emacs-lisp fennel asm nasm".split(), ";"),
    **dict.fromkeys("erlang matlab octave prolog".split(), "%"),
    "vim": '"',
    "fortran": "!",
    "vb": "'",
}

MAX_TYPED_CHANGE = 100  # characters in one edit; more is a paste or a tool's edit, not typing
MAX_RUN_CHARS = 4000  # a run this long without a line or sentence end is sent anyway

# Where typed text is finished: a line end, or a sentence end followed by a space.
_FINISHED = re.compile(r"\n|[.!?…][\"'”’)\]]*[ \t]")


def language_kind(language_id: str) -> str | None:
    """ "prose", "code" (line comments only), or None for a language this cannot read."""
    lang = language_id.lower()
    if lang in PROSE_LANGUAGES:
        return "prose"
    if lang in LINE_COMMENTS:
        return "code"
    return None


def _comment_body(line: str, marker: str) -> str | None:
    """The text of a comment-only line after its marker ("# foo" -> "foo"), else None."""
    stripped = line.lstrip()
    if not stripped.startswith(marker):
        return None
    return stripped[len(marker) :].lstrip(marker[-1]).lstrip(" \t")


def context_before(
    lines: list[str], language_id: str, kind: str | None, max_chars: int = 2000
) -> str | None:
    """The text the predictor should read for a cursor at the end of `lines[-1]`.

    `lines` are the document's lines up to the cursor (the last one cut at the cursor, no line
    ends); `kind` is "prose" or "code" (see `language_kind`). Prose: the text itself (commit
    messages without "#" lines). Code: the line comment the cursor is in, with the comment
    lines just above it; None when the cursor is not in a line comment, or for kind None.
    """
    if not lines:
        return ""
    lang = language_id.lower()
    if kind == "prose":
        keep = lines
        if lang in COMMIT_LANGUAGES:
            if lines[-1].startswith("#"):
                return None
            keep = [line for line in lines if not line.startswith("#")]
        out: list[str] = []
        size = 0
        for line in reversed(keep):
            out.append(line)
            size += len(line) + 1
            if size >= max_chars:
                break
        return "\n".join(reversed(out))[-max_chars:]
    if kind != "code" or lang not in LINE_COMMENTS:
        return None
    marker = LINE_COMMENTS[lang]
    current = lines[-1]
    at = current.find(marker)
    if at < 0:
        return None
    body = current[at + len(marker) :].lstrip(marker[-1]).lstrip(" \t")
    parts = [body]
    size = len(body)
    if current[:at].strip() == "":  # a comment-only line: the comment may go on from above
        for line in reversed(lines[:-1]):
            above = _comment_body(line, marker)
            if not above or size >= max_chars:  # code, or an empty comment line (paragraph)
                break
            parts.append(above)
            size += len(above) + 1
    return " ".join(reversed(parts))[-max_chars:]


def insertion(context: str, prefix: str, word: str) -> str:
    """The text that replaces `prefix` when the user takes `word`: a space goes before a
    next word that follows punctuation directly ("Hi," -> " there")."""
    if prefix or not context or context[-1].isspace() or context[-1] in "([{\"'“‘/-—":
        return word
    if not (word[:1].isalnum() or word[:1] in "([{\"'“‘"):
        return word  # punctuation attaches to the word before it
    return " " + word


def finished_text(head: str, text: str, language_id: str, kind: str | None) -> str:
    """The part of a finished piece of typing worth learning from.

    `head` is what stood on the piece's first line before it (to see whether that line is a
    comment or a commit template line). Prose keeps everything but commit template lines;
    code keeps only what was typed inside line comments.
    """
    lang = language_id.lower()
    lines = text.split("\n")
    if kind == "prose":
        kept = []
        for i, line in enumerate(lines):
            full = head + line if i == 0 else line
            if lang in COMMIT_LANGUAGES and full.startswith("#"):
                continue
            kept.append(line)
        return "\n".join(kept).strip()
    if kind != "code" or lang not in LINE_COMMENTS:
        return ""
    marker = LINE_COMMENTS[lang]
    kept = []
    for i, line in enumerate(lines):
        full, typed_from = (head + line, len(head)) if i == 0 else (line, 0)
        at = full.find(marker)
        if at < 0:
            continue
        body_from = at + len(marker)
        while body_from < len(full) and full[body_from] == marker[-1]:
            body_from += 1
        typed = full[max(body_from, typed_from) :].strip()
        if typed:
            kept.append(typed)
    return " ".join(kept)


@dataclass
class Piece:
    """Typed text that is finished, and what stood before it on its first line."""

    head: str
    text: str


class TypedRun:
    """The text typed in one stretch at one place in a document, cut into finished pieces.

    Fed the document's incremental changes in order (LSP positions: line, character in the
    client's units). Typing, backspacing and completions at the end of the run extend or cut
    it; an edit anywhere else, a paste or a tool's edit ends it. Only text typed here counts:
    what the file held before is never sent again.
    """

    def __init__(self, units: Callable[[str], int] = len) -> None:
        self.units = units  # length of a string in the client's position units (UTF-16...)
        self.text = ""
        self.head = ""
        self.start: tuple[int, int] | None = None

    @property
    def end(self) -> tuple[int, int] | None:
        if self.start is None:
            return None
        return self._advance(self.start, self.text)

    def _advance(self, pos: tuple[int, int], text: str) -> tuple[int, int]:
        newlines = text.count("\n")
        if not newlines:
            return pos[0], pos[1] + self.units(text)
        return pos[0] + newlines, self.units(text[text.rfind("\n") + 1 :])

    def _offset(self, line: int, character: int) -> int | None:
        """The index in `text` of a document position, or None if it lies outside the run."""
        assert self.start is not None
        k = line - self.start[0]
        run_lines = self.text.split("\n")
        if k < 0 or k >= len(run_lines):
            return None
        want = character - (self.start[1] if k == 0 else 0)
        if want < 0:
            return None
        base = sum(len(s) + 1 for s in run_lines[:k])
        used = 0
        for n, ch in enumerate(run_lines[k]):
            if used == want:
                return base + n
            used += self.units(ch)
        return base + len(run_lines[k]) if used == want else None

    def change(
        self,
        start: tuple[int, int],
        end: tuple[int, int],
        text: str,
        head_at: Callable[[int, int], str],
    ) -> list[Piece]:
        """Apply one edit (replace start..end with `text`); the pieces it finished.

        `head_at(line, character)` reads the document line's text before a position (after
        the edit), for a run that starts there.
        """
        pieces: list[Piece] = []
        offset = self._offset(*start) if self.start is not None and end == self.end else None
        if offset is not None and len(text) <= MAX_TYPED_CHANGE:
            self.text = self.text[:offset] + text
        else:
            pieces += self.flush()
            if start == end and text and len(text) <= MAX_TYPED_CHANGE:
                self.start, self.head, self.text = start, head_at(*start), text
        return pieces + self._cut()

    def _cut(self) -> list[Piece]:
        """Send what is finished (up to the last line or sentence end); keep the rest."""
        if self.start is None:
            return []
        ends = list(_FINISHED.finditer(self.text))
        last = ends[-1] if ends else None
        if last is None and len(self.text) < MAX_RUN_CHARS:
            return []
        cut = last.end() if last is not None else len(self.text)
        done, rest = self.text[:cut], self.text[cut:]
        piece = Piece(self.head, done)
        self.start = self._advance(self.start, done)
        self.head = done[done.rfind("\n") + 1 :] if "\n" in done else self.head + done
        self.text = rest
        return [piece]

    def flush(self) -> list[Piece]:
        """End the run: all of its text is finished."""
        pieces = [Piece(self.head, self.text)] if self.start is not None and self.text else []
        self.text, self.head, self.start = "", "", None
        return pieces
