"""A real headless Neovim with editors/nvim: it types into a buffer in insert mode, asks for
completion (<C-x><C-o>), takes a suggestion, and the daemon serves and logs it all."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_process import Served, serve
from wordahead.daemon.client import DaemonClient

PLUGIN = Path(__file__).resolve().parent.parent / "editors" / "nvim"
NVIM = shutil.which("nvim")

pytestmark = pytest.mark.skipif(
    NVIM is None,
    reason="nvim is not installed: install Neovim >= 0.10 (Debian: apt-get install neovim) to run it",
)

# Runs inside Neovim. Keys go through nvim_input (the real input queue, as typed); timers wait
# for the asynchronous LSP answers while Neovim stays in insert mode.
DRIVER = r"""
local out = os.getenv("KB_OUT")
local result = { stage = "start" }
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
vim.o.completeopt = "menuone,noselect"
vim.o.swapfile = false
require("keyboard").setup({
  cmd = { os.getenv("KB_PYTHON"), "-m", "wordahead", "lsp" },
  filetypes = { "text" },
  init_options = { debounce_ms = 0 },
})
vim.cmd("edit " .. vim.fn.fnameescape(os.getenv("KB_FILE")))
result.filetype = vim.bo.filetype
result.omnifunc = vim.bo.omnifunc
result.commands = vim.tbl_map(function(name) return vim.fn.exists(":" .. name) end,
  { "KeyboardPause", "KeyboardResume", "KeyboardStatus" })

local function client()
  for _, c in pairs(vim.lsp.buf_get_clients(0)) do
    if c.name == "keyboard" and c.initialized then return c end
  end
end
if not vim.wait(20000, function() return client() ~= nil end, 20) then
  return finish("the keyboard language server did not attach")
end

vim.api.nvim_create_autocmd("CompleteDone", {
  callback = function() result.completed = vim.v.completed_item end,
})

local steps = {}
local function after(ms, fn) vim.defer_fn(fn, ms) end
local function poll(check, fn, timeout, what)
  local waited = 0
  local function tick()
    if check() then return fn() end
    waited = waited + 25
    if waited > timeout then return finish("timed out waiting for " .. what) end
    after(25, tick)
  end
  tick()
end

-- 1. Type in insert mode and ask for completion.
result.stage = "typing"
vim.api.nvim_input("iI would like to <C-x><C-o>")
poll(function()
  return vim.fn.mode() == "i" and #vim.fn.complete_info({ "items" }).items > 0
end, function()
  result.items = vim.fn.complete_info({ "items" }).items
  -- 2. Take the first suggestion, then finish the sentence and start another.
  result.stage = "accepting"
  vim.api.nvim_input("<C-n><C-y>")
  poll(function() return result.completed ~= nil end, function()
    vim.api.nvim_input(" now. Then we")
    after(300, function()
      -- 3. Leave insert mode and save (didSave sends the unfinished sentence too).
      vim.api.nvim_input("<Esc>:w<CR>")
      after(500, function()
        result.stage = "done"
        finish(nil)
      end)
    end)
  end, 10000, "CompleteDone")
end, 15000, "completion items")
"""


@pytest.fixture(scope="module")
def served(tiny_llama: Path) -> Iterator[Served]:
    yield from serve(tiny_llama)


def run_driver(driver: str, served: Served, tmp_path: Path, file: Path) -> dict[str, Any]:
    """Run the Lua `driver` in a headless Neovim on `file`, against the daemon `served`, with
    the plugin on its runtime path; the result it wrote, checked for its own error."""
    script = tmp_path / "driver.lua"
    script.write_text(driver)
    out = tmp_path / "result.json"
    env = dict(
        os.environ,
        KB_OUT=str(out),
        KB_PLUGIN=str(PLUGIN),
        KB_PYTHON=sys.executable,
        KB_FILE=str(file),
        KEYBOARD_SOCKET=str(served.socket),
        KEYBOARD_HOME=str(served.home),
        XDG_STATE_HOME=str(tmp_path / "state"),  # Neovim's lsp.log and shada stay here
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    assert NVIM is not None
    proc = subprocess.run(
        [NVIM, "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}"],
        env=env,
        capture_output=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.exists(), f"Neovim wrote no result:\n{proc.stdout!r}\n{proc.stderr!r}"
    result: dict[str, Any] = json.loads(out.read_text())
    assert result.get("error") is None, (result, proc.stderr)
    return result


def entries(served: Served) -> list[tuple[str, str, str]]:
    with sqlite3.connect(served.home / "typing_log.db") as db:
        return list(db.execute("SELECT source, kind, text FROM entries ORDER BY id"))


def test_neovim_types_and_completes(served: Served, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    # What the menu will show, asked now: once Neovim sends the typed line, the daemon learns
    # it (wordahead.predict.sources.live_phrases) and its next words after "I would like to " may change.
    with DaemonClient(served.socket) as client:
        expected = client.call("predict", context="I would like to ", k=5)
    result = run_driver(DRIVER, served, tmp_path, note)
    assert result["filetype"] == "text"
    assert result["omnifunc"] == "v:lua.vim.lsp.omnifunc"
    assert result["commands"] == [2, 2, 2]  # :KeyboardPause, :KeyboardResume, :KeyboardStatus

    # The menu holds the daemon's next words for the text typed before the cursor.
    words = [c["word"] for c in expected["candidates"] if c["kind"] == "word"]
    assert [item["word"] for item in result["items"]] == words
    # A probability only where it means something: never "0%".
    assert all(re.fullmatch(r"([1-9]\d*% )?keyboard", item["menu"]) for item in result["items"])

    # The first word was taken into the buffer and reported back as accepted.
    first = words[0]
    assert result["completed"]["word"] == first
    assert result["lines"][0] == f"I would like to {first} now. Then we"
    assert note.read_text() == result["lines"][0] + "\n"
    source = f"text:{note}"
    logged = entries(served)
    assert any(kind == "accepted" and first in text for _, kind, text in logged), logged
    assert (source, "typed", f"I would like to {first} now.") in logged
    assert (source, "typed", "Then we") in logged
