"""install: keyboard in the user's session: the command on PATH, services, uninstall."""
