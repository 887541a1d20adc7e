"""Where keyboard keeps its state: the keyboard home, the database, adapters, the socket."""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from wordahead.types import KeyboardError

APP_NAME = "keyboard"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) readable by the user only (0700), and return it. A
    directory that belongs to another user is refused with a message that says what to do."""
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise KeyboardError(
            f"cannot create {path}: {exc.strerror}; create it yourself (mode 0700) or pick "
            "another place (KEYBOARD_HOME, --socket)"
        ) from None
    finally:
        os.umask(old)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise KeyboardError(
            f"{path} belongs to another user (uid {st.st_uid}), so keyboard will not keep "
            "anything there; remove it (as that user or root) or pick another place "
            "(KEYBOARD_HOME, --socket)"
        )
    if st.st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return path


def make_private(root: Path) -> None:
    """Tighten what an older version (or a loose umask) left under `root`: files 0600,
    directories 0700. Links are left alone; only the user's own entries are touched."""
    uid = os.geteuid()
    for dirpath, dirnames, filenames in os.walk(root):
        for name, mode in [(d, 0o700) for d in dirnames] + [(f, 0o600) for f in filenames]:
            entry = Path(dirpath) / name
            try:
                st = entry.lstat()
                if st.st_uid == uid and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o777 != mode:
                    os.chmod(entry, mode)
            except OSError:
                continue


def open_no_follow(path: Path, flags: int, mode: int = 0o600) -> int:
    """`os.open(path, flags, mode)` for a file keyboard keeps (a lock, log, pid or state
    file), refusing a symbolic link planted in its place: written through, its target (any
    file of the user's) would be overwritten. Created `mode` from the first byte."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise KeyboardError(
            f"{path} is a symbolic link, and keyboard does not write through links in its "
            f"files (its target would be overwritten); remove it (`rm {path}`) and retry"
        ) from None


def check_socket_dir(directory: Path) -> Path:
    """`directory` (symlinks resolved) if only this user can create or replace a socket in
    it, else a KeyboardError naming the path and the fix.

    The directory must be the user's own and writable by no one else; every directory above
    it must belong to the user or root and be writable by no one else unless it is sticky
    (as /tmp is), so that nobody can swap a directory on the way for one of their own.
    """
    real = directory.resolve()
    uid = os.geteuid()
    fix = (
        "pick a socket in a directory only you can write, e.g. the default "
        "($XDG_RUNTIME_DIR/keyboard or the keyboard home), with --socket or KEYBOARD_SOCKET"
    )
    st = real.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise KeyboardError(f"{real} is not a directory; {fix}")
    if st.st_uid != uid:
        raise KeyboardError(
            f"the socket directory {real} belongs to another user (uid {st.st_uid}), who could "
            f"replace the socket and read what you type; {fix}"
        )
    if _others_can_write(st):
        raise KeyboardError(
            f"the socket directory {real} can be written by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), who could replace the socket and read what you "
            f"type; {fix}, or `chmod go-w {real}`"
        )
    for parent in real.parents:
        pst = parent.stat()
        if pst.st_uid not in (uid, 0):
            raise KeyboardError(
                f"{parent}, above the socket directory {real}, belongs to another user (uid "
                f"{pst.st_uid}), who could swap the directory for one of their own; {fix}"
            )
        if _others_can_write(pst) and not pst.st_mode & stat.S_ISVTX:
            raise KeyboardError(
                f"{parent}, above the socket directory {real}, can be written by other users "
                f"(mode {stat.S_IMODE(pst.st_mode):04o}), who could swap the directory for one "
                f"of their own; {fix}"
            )
    return real


def _others_can_write(st: os.stat_result) -> bool:
    """Whether users other than this one may write to a directory with status `st`. Group
    write is fine for a user private group (the user's own, with no other members)."""
    if st.st_mode & 0o002:
        return True
    if not st.st_mode & 0o020 or st.st_gid != os.getegid():
        return bool(st.st_mode & 0o020)
    try:
        import grp
        import pwd

        members = set(grp.getgrgid(st.st_gid).gr_mem)
        me = pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return True
    return not members <= {me}


def pid_file(socket_path: Path) -> Path:
    """The daemon's pid file, beside its socket (`keyboard stop` reads it when `status` fails)."""
    return socket_path.with_name(socket_path.stem + ".pid")


def keyboard_command(*args: str) -> list[str]:
    """`python -m wordahead ARGS` for a child process (the background daemon, the job, a timer)
    that imports the installed package whatever the working directory: with plain `-m`, a
    folder named keyboard there (the checkout, seen from its parent) would shadow it."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "wordahead", *args]
    code = "import sys; del sys.path[0]; from wordahead.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def home() -> Path:
    """The keyboard home: `$KEYBOARD_HOME`, else the platform's user data dir. Created 0700."""
    override = os.environ.get("KEYBOARD_HOME")
    if override:
        base = Path(override).expanduser()
    else:
        import platformdirs

        base = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    return private_dir(base)


@dataclass(frozen=True)
class Home:
    """One user's keyboard home and the files in it. Resolved once (`from_env`) where the
    program starts, then passed to what keeps state there: nothing else reads the environment.
    """

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Home:
        """The home at `root`, created 0700 if it does not exist."""
        return cls(private_dir(Path(root).expanduser()))

    @classmethod
    def from_env(cls) -> Home:
        return cls(home())

    @property
    def typing_log(self) -> Path:
        """The typing log's SQLite file."""
        return self.root / "typing_log.db"

    @property
    def adapters(self) -> Path:
        """Where adapter versions live (a store per model inside)."""
        return private_dir(self.root / "adapters")

    @property
    def training_graphs(self) -> Path:
        """ORT training graphs made for the adapter groups a job trains (a cache)."""
        return private_dir(self.root / "cache" / "training")

    @property
    def job_config(self) -> Path:
        """The personalization job's settings."""
        return self.root / "personalize.json"

    @property
    def job_lock(self) -> Path:
        """Held by the personalization job while it runs."""
        return self.root / "personalize.lock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the daemon serving this home."""
        return self.root / "daemon.lock"

    @property
    def job_failure(self) -> Path:
        """The last personalization job failure: a fixed-size record, written in place."""
        return self.root / "job-failure.json"

    @property
    def daemon_log(self) -> Path:
        """Where a daemon started in the background writes its log."""
        return self.root / "daemon.log"


def socket_path() -> Path:
    """The daemon's Unix socket: `$KEYBOARD_SOCKET`, else `$XDG_RUNTIME_DIR/keyboard/`, else the home."""
    override = os.environ.get("KEYBOARD_SOCKET")
    if override:
        return Path(override).expanduser()
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return private_dir(Path(runtime_dir) / APP_NAME) / "keyboard.sock"
    return home() / "keyboard.sock"


PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_STARTER = "starter_model"  # in an installed package: the starter model (setup.py)


def repo_root() -> Path:
    """The source checkout that holds `models/` (for an installed package: where it lies)."""
    return PACKAGE_DIR.parent


def default_model_dir() -> Path:
    """The model to serve and train when none is named: `$KEYBOARD_MODEL`, else the shipped
    starter model."""
    override = os.environ.get("KEYBOARD_MODEL")
    if override:
        return Path(override).expanduser()
    return starter_model_dir()


def starter_model_dir() -> Path:
    """The starter model: the copy an installed package ships inside it, else `models/starter`
    of the checkout (an editable install, or the tree itself)."""
    shipped = PACKAGE_DIR / SHIPPED_STARTER
    return shipped if shipped.is_dir() else repo_root() / "models" / "starter"
