"""Ghost text in a real headless Neovim with editors/nvim: the daemon's phrase appears after
the cursor, a key takes its next word, another the rest, and the taking is reported."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_process import Served
from tests.test_ghost_text import serve_phrases
from tests.test_nvim import NVIM, run_driver
from wordahead.daemon.client import DaemonClient

pytestmark = pytest.mark.skipif(NVIM is None, reason="nvim is not installed")

DRIVER = r"""
local out = os.getenv("KB_OUT")
local result = {}
local function finish(err)
  result.error = err
  result.lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
  local f = assert(io.open(out, "w"))
  f:write(vim.fn.json_encode(result))
  f:close()
  vim.cmd("qa!")
end

vim.opt.runtimepath:append(os.getenv("KB_PLUGIN"))
vim.cmd("filetype on")
vim.o.swapfile = false
require("keyboard").setup({
  cmd = { os.getenv("KB_PYTHON"), "-m", "wordahead", "lsp" },
  filetypes = { "text" },
  init_options = { debounce_ms = 0 },
  ghost = { delay_ms = 10 },
})
vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("KB_FILE")))
local ghost = require("keyboard.ghost")

local function client()
  for _, c in pairs(vim.lsp.buf_get_clients(0)) do
    if c.name == "keyboard" and c.initialized then return c end
  end
end
if not vim.wait(20000, function() return client() ~= nil end, 20) then
  return finish("the keyboard language server did not attach")
end

local function poll(check, fn, timeout, what)
  local waited = 0
  local function tick()
    if check() then return fn() end
    waited = waited + 25
    if waited > timeout then return finish("timed out waiting for " .. what) end
    vim.defer_fn(tick, 25)
  end
  tick()
end

local function line() return vim.api.nvim_buf_get_lines(0, 0, 1, false)[1] end

vim.api.nvim_input("iI would like to bo")
poll(function() return ghost.shown() ~= nil end, function()
  result.shown = ghost.shown()
  local ns = vim.api.nvim_get_namespaces()["keyboard_ghost"]
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  result.virt_text = marks[1] and marks[1][4].virt_text[1][1]
  result.mark_col = marks[1] and marks[1][3]
  vim.api.nvim_input("<M-Right>")
  poll(function() return line() ~= "I would like to bo" end, function()
    result.after_word = line()
    result.rest = ghost.shown()
    vim.api.nvim_input("<Tab>")
    poll(function() return line() ~= result.after_word end, function()
      result.after_all = line()
      result.cursor = vim.api.nvim_win_get_cursor(0)
      result.mode = vim.fn.mode()
      vim.defer_fn(function() finish(nil) end, 500)
    end, 5000, "the rest of the phrase")
  end, 5000, "the next word")
end, 20000, "ghost text")
"""


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Served]:
    yield from serve_phrases(tiny_llama)


def test_neovim_shows_the_phrase_and_keys_take_it(served: Served, tmp_path: Path) -> None:
    with DaemonClient(served.socket) as client:
        phrase = client.call("phrase", context="I would like to bo")["phrase"]
    assert phrase is not None
    result = run_driver(DRIVER, served, tmp_path, tmp_path / "note.txt")
    # The ghost is the rest of the phrase after what was typed, drawn at the cursor.
    assert result["shown"] == phrase["text"] == result["virt_text"]
    assert result["mark_col"] == len("I would like to bo")
    first, *rest = phrase["words"]
    assert result["after_word"] == "I would like to " + first
    assert result["rest"] == "".join(" " + w for w in rest)
    assert result["after_all"] == "I would like to " + " ".join(phrase["words"])
    assert result["cursor"] == [1, len(result["after_all"])]
    assert result["mode"] == "i"
    # Taking it is reported like a word: the words the user ended up with.
    accepted = " ".join(phrase["words"])
    with sqlite3.connect(served.home / "typing_log.db") as db:
        rows = list(db.execute("SELECT accepted FROM entries WHERE kind = 'accepted'"))
    assert (accepted,) in rows
