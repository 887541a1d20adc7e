-- keyboard ghost text: the daemon's phrase (textDocument/inlineCompletion) shown after the
-- cursor in insert mode, taken whole or a word at a time with a key.
--
-- Neovim 0.12+ has ghost text of its own (vim.lsp.inline_completion): it is used when
-- present (`native = true`), with its own accept; otherwise the phrase is drawn as virtual
-- text with an extmark (inline from 0.10, over the end of the line before that).

local M = {}

M.defaults = {
  enabled = true,
  native = true, -- use vim.lsp.inline_completion where this Neovim has it
  delay_ms = 60, -- after a keystroke, ask for a phrase once typing pauses this long
  hl_group = "Comment",
  keys = {
    accept = "<Tab>", -- take the whole phrase (no phrase shown: the key does what it did)
    accept_word = "<M-Right>", -- take its next word; the rest stays shown
    dismiss = "<C-]>", -- hide it until the next keystroke
  },
}

local ns = vim.api.nvim_create_namespace("keyboard_ghost")
-- Per buffer: { row, col, text, item, taken, tick, timer }
local state = {}

local function call(client, name, ...)
  if vim.fn.has("nvim-0.11") == 1 then
    return client[name](client, ...)
  end
  return client[name](...)
end

local function clear(bufnr, report)
  local s = state[bufnr]
  if not s then
    return
  end
  pcall(vim.api.nvim_buf_clear_namespace, bufnr, ns, 0, -1)
  if report and s.taken ~= "" and s.item and s.client then
    -- What was taken is reported like a taken word: the words the user ended up with.
    local command = s.item.command
    if type(command) == "table" and type(command.arguments) == "table" then
      local arg = vim.deepcopy(command.arguments[1])
      arg.accepted = vim.trim(s.prefix .. s.taken)
      local params = { command = command.command, arguments = { arg } }
      call(s.client, "request", "workspace/executeCommand", params, function() end, bufnr)
    end
  end
  s.text, s.item, s.taken, s.prefix = nil, nil, "", ""
end

local function draw(bufnr)
  local s = state[bufnr]
  pcall(vim.api.nvim_buf_clear_namespace, bufnr, ns, 0, -1)
  if not s or not s.text or s.text == "" then
    return
  end
  local line = vim.api.nvim_buf_get_lines(bufnr, s.row, s.row + 1, false)[1] or ""
  local opts = { virt_text = { { s.text, s.hl_group } }, hl_mode = "combine" }
  if vim.fn.has("nvim-0.10") == 1 then
    opts.virt_text_pos = "inline"
  elseif s.col >= #line then
    opts.virt_text_pos = "overlay"
  else
    opts.virt_text_pos = "eol"
  end
  vim.api.nvim_buf_set_extmark(bufnr, ns, s.row, math.min(s.col, #line), opts)
end

-- The phrase's text after the cursor: insertText replaces the range from its start to the
-- cursor, so what the user typed of it there is not shown again.
local function ghost_of(item, line, col, encoding)
  local text = item.insertText
  if type(text) == "table" then
    text = text.value
  end
  if type(text) ~= "string" or not item.range then
    return nil, ""
  end
  local start = item.range.start.character
  local ok, byte = pcall(vim.str_byteindex, line, start, encoding ~= "utf-8")
  if not ok then
    return nil, ""
  end
  local typed = line:sub(byte + 1, col)
  if text:sub(1, #typed) ~= typed then
    return nil, ""
  end
  return text:sub(#typed + 1), typed
end

local function request(bufnr, get_client)
  local s = state[bufnr]
  local client = get_client()
  if not s or not client or vim.fn.mode() ~= "i" or vim.api.nvim_get_current_buf() ~= bufnr then
    return
  end
  local cursor = vim.api.nvim_win_get_cursor(0)
  local row, col = cursor[1] - 1, cursor[2]
  local encoding = client.offset_encoding or "utf-16"
  local params = vim.lsp.util.make_position_params(0, encoding)
  params.context = { triggerKind = 2 }
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  s.tick = tick
  call(client, "request", "textDocument/inlineCompletion", params, function(err, result)
    if err or s.tick ~= tick or vim.api.nvim_buf_get_changedtick(bufnr) ~= tick then
      return -- a newer keystroke asks for its own phrase
    end
    local items = type(result) == "table" and (result.items or result) or {}
    local item = items[1]
    if not item or vim.fn.mode() ~= "i" then
      return
    end
    local now = vim.api.nvim_win_get_cursor(0)
    if now[1] - 1 ~= row or now[2] ~= col then
      return
    end
    local line = vim.api.nvim_buf_get_lines(bufnr, row, row + 1, false)[1] or ""
    local text, typed = ghost_of(item, line, col, encoding)
    if not text or text == "" then
      return
    end
    s.row, s.col, s.text, s.item, s.client = row, col, text, item, client
    s.taken, s.prefix = "", typed
    draw(bufnr)
  end, bufnr)
end

-- Put `piece` at the cursor (the ghost's start) and move past it.
local function insert(bufnr, piece)
  local s = state[bufnr]
  local lines = vim.split(piece, "\n", { plain = true })
  vim.api.nvim_buf_set_text(bufnr, s.row, s.col, s.row, s.col, lines)
  local row = s.row + #lines - 1
  local col = (#lines == 1 and s.col or 0) + #lines[#lines]
  s.row, s.col = row, col
  s.tick = vim.api.nvim_buf_get_changedtick(bufnr) -- our own edit: no new request for it
  s.own_edit = s.tick
  vim.api.nvim_win_set_cursor(0, { row + 1, col })
end

function M.shown(bufnr)
  local s = state[bufnr or vim.api.nvim_get_current_buf()]
  return s and s.text or nil
end

-- Take the whole phrase. Returns false when none is shown.
function M.accept(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = state[bufnr]
  if not s or not s.text or s.text == "" then
    return false
  end
  local text = s.text
  insert(bufnr, text)
  s.taken = s.taken .. text
  s.text = nil
  clear(bufnr, true)
  return true
end

-- Take the phrase's next word (with the space before it); the rest stays shown.
function M.accept_word(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = state[bufnr]
  if not s or not s.text or s.text == "" then
    return false
  end
  local word = s.text:match("^%s*[^%s]+") or s.text
  insert(bufnr, word)
  s.taken = s.taken .. word
  s.text = s.text:sub(#word + 1)
  if s.text == "" then
    clear(bufnr, true)
  else
    draw(bufnr)
  end
  return true
end

function M.dismiss(bufnr)
  bufnr = bufnr or vim.api.nvim_get_current_buf()
  local s = state[bufnr]
  if not s or not s.text then
    return false
  end
  clear(bufnr, true)
  return true
end

local function map(bufnr, lhs, action)
  if not lhs or lhs == "" then
    return
  end
  vim.keymap.set("i", lhs, function()
    if not action(bufnr) then
      -- Nothing shown: the key does what it did without the plugin.
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(lhs, true, false, true), "n", false)
    end
  end, { buffer = bufnr, desc = "keyboard ghost text" })
end

local function native(bufnr, opts)
  local inline = vim.lsp.inline_completion
  if not (opts.native and type(inline) == "table" and inline.enable) then
    return false
  end
  inline.enable(true, { bufnr = bufnr })
  if opts.keys.accept and opts.keys.accept ~= "" then
    vim.keymap.set("i", opts.keys.accept, function()
      if not inline.get() then
        return opts.keys.accept
      end
    end, { buffer = bufnr, expr = true, replace_keycodes = true, desc = "keyboard ghost text" })
  end
  return true
end

-- Show ghost text in `bufnr`; `get_client` returns the keyboard LSP client (or nil).
function M.attach(bufnr, get_client, opts)
  opts = vim.tbl_deep_extend("force", {}, M.defaults, opts or {})
  if not opts.enabled or state[bufnr] then
    return
  end
  if native(bufnr, opts) then
    state[bufnr] = { native = true }
    return
  end
  local s = { taken = "", prefix = "", hl_group = opts.hl_group, timer = (vim.uv or vim.loop).new_timer() }
  state[bufnr] = s
  local group = vim.api.nvim_create_augroup("keyboard_ghost_" .. bufnr, { clear = true })
  vim.api.nvim_create_autocmd({ "TextChangedI", "TextChangedP" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      if s.own_edit == vim.api.nvim_buf_get_changedtick(bufnr) and s.text then
        return -- a word of the phrase was just taken: the rest is still right
      end
      clear(bufnr, true)
      s.timer:stop()
      s.timer:start(opts.delay_ms, 0, vim.schedule_wrap(function()
        request(bufnr, get_client)
      end))
    end,
  })
  vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      s.timer:stop()
      clear(bufnr, true)
    end,
  })
  vim.api.nvim_create_autocmd("BufWipeout", {
    group = group,
    buffer = bufnr,
    callback = function()
      s.timer:stop()
      s.timer:close()
      state[bufnr] = nil
    end,
  })
  map(bufnr, opts.keys.accept, M.accept)
  map(bufnr, opts.keys.accept_word, M.accept_word)
  map(bufnr, opts.keys.dismiss, M.dismiss)
end

return M
