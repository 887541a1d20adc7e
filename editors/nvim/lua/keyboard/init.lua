-- keyboard: next-word predictions from the local keyboard daemon, through `keyboard lsp`.
--
--   require("keyboard").setup({ filetypes = { "text", "markdown", "gitcommit" } })
--
-- Works with Neovim 0.7 (Debian bookworm) and later: it uses vim.lsp.start where it exists
-- (0.8+) and vim.lsp.start_client + buf_attach_client before that. Completions arrive through
-- 'omnifunc' (<C-x><C-o>) or any completion plugin that reads LSP sources (nvim-cmp, ...).

local M = {}

M.defaults = {
  -- The language server command; the daemon must be running (`keyboard serve`).
  cmd = { "keyboard", "lsp" },
  -- Filetypes to attach to. Prose is predicted everywhere; code only inside line comments.
  filetypes = { "text", "markdown", "gitcommit", "mail", "rst", "org", "tex" },
  -- Send finished text and accepted suggestions to the typing log (which redacts secrets,
  -- skips excluded files and honours `keyboard pause`).
  logging = true,
  -- Set 'omnifunc' in attached buffers, so <C-x><C-o> asks keyboard.
  omnifunc = true,
  -- Extra initializationOptions: debounce_ms, items, inline_words, context_chars.
  init_options = {},
  -- Ghost text: the daemon's phrase after the cursor in insert mode (lua/keyboard/ghost.lua):
  -- { enabled = true, delay_ms = 60, hl_group = "Comment",
  --   keys = { accept = "<Tab>", accept_word = "<M-Right>", dismiss = "<C-]>" } }
  ghost = {},
}

local config = nil
local client_id = nil
local augroup = nil

local function notify(message, level)
  vim.notify("keyboard: " .. message, level or vim.log.levels.INFO)
end

-- Call a client method with the syntax this Neovim expects (0.11 deprecates `client.request`).
local function client_call(client, name, ...)
  if vim.fn.has("nvim-0.11") == 1 then
    return client[name](client, ...)
  end
  return client[name](...)
end

local function current_client()
  local client = client_id and vim.lsp.get_client_by_id(client_id)
  if client and not client_call(client, "is_stopped") then
    return client
  end
  return nil
end

local function client_config()
  local options = vim.tbl_extend("force", {}, config.init_options or {})
  options.filetypes = config.filetypes
  options.logging = config.logging
  return {
    name = "keyboard",
    cmd = config.cmd,
    root_dir = (vim.uv or vim.loop).cwd(),
    init_options = options,
    -- One suggestion per keystroke is the point: send changes quickly. At exit, give the
    -- server a moment to hand the last typed sentence to the daemon.
    flags = { debounce_text_changes = 50, exit_timeout = 2000 },
    on_exit = function()
      client_id = nil
    end,
  }
end

-- Report a taken suggestion: Neovim's own omnifunc does not run CompletionItem.command.
local function on_complete_done()
  local completed = vim.v.completed_item
  local data = type(completed) == "table" and completed.user_data
  local item = type(data) == "table" and data.nvim and data.nvim.lsp and data.nvim.lsp.completion_item
  local command = type(item) == "table" and item.command
  if type(command) ~= "table" or command.command ~= "keyboard.accept" then
    return
  end
  local client = current_client()
  if client then
    local params = { command = command.command, arguments = command.arguments }
    client_call(client, "request", "workspace/executeCommand", params, function() end)
  end
end

-- One server for every buffer, whatever its directory: predictions do not depend on a project.
local function reuse(client)
  return client.name == "keyboard"
end

local function start(bufnr)
  return vim.lsp.start(client_config(), { bufnr = bufnr, reuse_client = reuse })
end

local function attach(bufnr)
  if vim.lsp.start then
    client_id = start(bufnr)
  else
    if not current_client() then
      client_id = vim.lsp.start_client(client_config())
    end
    if client_id then
      vim.lsp.buf_attach_client(bufnr, client_id)
    end
  end
  if not client_id then
    notify("could not start `" .. table.concat(config.cmd, " ") .. "`", vim.log.levels.ERROR)
    return
  end
  if config.omnifunc then
    vim.bo[bufnr].omnifunc = "v:lua.vim.lsp.omnifunc"
  end
  require("keyboard.ghost").attach(bufnr, current_client, config.ghost)
  vim.api.nvim_clear_autocmds({ group = augroup, buffer = bufnr, event = "CompleteDone" })
  vim.api.nvim_create_autocmd("CompleteDone", {
    group = augroup,
    buffer = bufnr,
    callback = on_complete_done,
  })
end

-- Run a keyboard.* command on the server (starting it if no buffer has yet) and show the answer.
local function execute(command, show)
  local client = current_client()
  if not client then
    if vim.lsp.start then
      client_id = start(vim.api.nvim_get_current_buf())
    else
      client_id = vim.lsp.start_client(client_config())
    end
    client = current_client()
    if not client then
      notify("the language server is not running", vim.log.levels.ERROR)
      return
    end
  end
  vim.wait(5000, function()
    return client.initialized
  end, 20)
  local params = { command = command, arguments = {} }
  client_call(client, "request", "workspace/executeCommand", params, function(err, result)
    if err then
      notify(err.message or vim.inspect(err), vim.log.levels.ERROR)
    else
      show(result)
    end
  end)
end

function M.pause()
  execute("keyboard.pause", function(result)
    notify("logging paused in this editor; daemon: " .. tostring(result and result.daemon))
  end)
end

function M.resume()
  execute("keyboard.resume", function(result)
    notify("logging resumed in this editor; daemon: " .. tostring(result and result.daemon))
  end)
end

function M.status()
  execute("keyboard.status", function(result)
    local log = result.typing_log or {}
    local adapter = result.adapter or {}
    local model = result.model or {}
    notify(string.format(
      "model %s, adapter %s; logging %s (editor %s); %s entries",
      tostring(model.name),
      tostring(adapter.version),
      log.paused and "PAUSED" or "on",
      (result.editor and result.editor.paused) and "paused" or "on",
      tostring(log.entries)
    ))
  end)
end

function M.setup(opts)
  config = vim.tbl_deep_extend("force", {}, M.defaults, opts or {})
  if opts and opts.filetypes then
    config.filetypes = opts.filetypes -- a list replaces the default list, not merged into it
  end
  augroup = vim.api.nvim_create_augroup("keyboard", { clear = true })
  vim.api.nvim_create_autocmd("FileType", {
    group = augroup,
    pattern = config.filetypes,
    callback = function(args)
      attach(args.buf)
    end,
  })
  -- Buffers already open when setup() runs (e.g. lazy-loaded after the first file).
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr)
      and vim.tbl_contains(config.filetypes, vim.bo[bufnr].filetype) then
      attach(bufnr)
    end
  end
  vim.api.nvim_create_user_command("KeyboardPause", M.pause, { desc = "keyboard: stop logging" })
  vim.api.nvim_create_user_command("KeyboardResume", M.resume, { desc = "keyboard: log again" })
  vim.api.nvim_create_user_command("KeyboardStatus", M.status, { desc = "keyboard: status" })
end

return M
