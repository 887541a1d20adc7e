// keyboard for VS Code: launches `keyboard lsp`, which forwards to the local keyboard daemon.
import * as vscode from "vscode";
import {
  ExecuteCommandRequest,
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  TransportKind,
} from "vscode-languageclient/node";

let client: LanguageClient | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const config = vscode.workspace.getConfiguration("keyboard");
  const command = config.get<string[]>("command", ["keyboard", "lsp"]);
  const languages = config.get<string[]>("languages", ["plaintext", "markdown", "git-commit"]);
  if (command.length === 0) {
    void vscode.window.showErrorMessage("keyboard: the setting keyboard.command is empty");
    return;
  }

  const serverOptions: ServerOptions = {
    command: command[0],
    args: command.slice(1),
    transport: TransportKind.stdio,
  };
  const clientOptions: LanguageClientOptions = {
    // Every scheme (files and untitled buffers); the server skips excluded paths itself.
    documentSelector: languages.map((language) => ({ language })),
    initializationOptions: {
      ...config.get<object>("initializationOptions", {}),
      filetypes: languages,
      logging: config.get<boolean>("logging", true),
    },
  };
  client = new LanguageClient("keyboard", "keyboard", serverOptions, clientOptions);

  // The server's own commands (keyboard.pause, ...) are registered by the client under those
  // ids; these are the palette entries that call them and show the answer.
  const run = (serverCommand: string, show: (result: any) => string) => async () => {
    if (!client) {
      return;
    }
    try {
      const result = await client.sendRequest(ExecuteCommandRequest.type, {
        command: serverCommand,
        arguments: [],
      });
      void vscode.window.showInformationMessage(`keyboard: ${show(result)}`);
    } catch (err) {
      void vscode.window.showErrorMessage(`keyboard: ${err instanceof Error ? err.message : err}`);
    }
  };
  context.subscriptions.push(
    vscode.commands.registerCommand(
      "keyboard.pauseLogging",
      run("keyboard.pause", (r) => `logging paused in this editor; daemon: ${r?.daemon}`),
    ),
    vscode.commands.registerCommand(
      "keyboard.resumeLogging",
      run("keyboard.resume", (r) => `logging resumed in this editor; daemon: ${r?.daemon}`),
    ),
    vscode.commands.registerCommand(
      "keyboard.showStatus",
      run(
        "keyboard.status",
        (r) =>
          `model ${r?.model?.name}, adapter ${r?.adapter?.version}, logging ` +
          `${r?.typing_log?.paused ? "PAUSED" : "on"}, ${r?.typing_log?.entries} entries`,
      ),
    ),
  );

  await client.start();
}

export async function deactivate(): Promise<void> {
  if (client) {
    await client.stop();
    client = undefined;
  }
}
