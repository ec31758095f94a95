"""Serving the page on a network: who may read which file (`readable_upload`), sessions and their Stop
events, Gradio's launch options and cache, the network warning, SIGTERM. Shared by the app and both tools; no torch.
"""

import argparse
import logging
import os
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from studio.params import Flag, positive_int

logger = logging.getLogger(__name__)

LAN_HOST = "0.0.0.0"  # every interface: the app and the tools are reachable from the LAN unless told otherwise
# Gradio's cache (uploads, and the copies of results it serves to the page) is deleted by Gradio's own
# delete_cache after this long, or after OUTPUTS_MAX_AGE_HOURS when that is shorter.
GRADIO_CACHE_MAX_AGE_S = 3600
# The one answer for any file a client may not read, whether or not it exists (so it reveals nothing).
NOT_AN_UPLOAD_MESSAGE = ("This image was not uploaded to this app (or it was cleaned from its upload cache): upload "
                         "the image again, or pick one of the examples.")


def parse_auth(text: str) -> tuple[str, str]:
    """argparse `type=` for --auth / QIL_AUTH: USER:PASSWORD, both non-empty."""
    user, _, password = text.partition(":")
    if not user or not password:
        raise argparse.ArgumentTypeError("write USER:PASSWORD, both non-empty (e.g. --auth alice:s3cret)")
    return user, password


def serving_flags(host: str, port: int, max_upload_size: str, commands: tuple[str, ...]) -> tuple[Flag, ...]:
    """The flags of a served page (the app's and the tools'): where it listens, its login, its upload limit."""
    return (
        Flag("host", host, "--host", "the address to listen on; 127.0.0.1 keeps it on this machine", commands=commands),
        Flag("port", port, "--port", "the port to listen on", type=positive_int, commands=commands),
        Flag("auth", None, "--auth", "ask for this login (Gradio's auth); QIL_AUTH keeps it off the command line",
             type=parse_auth, metavar="USER:PASSWORD", commands=commands, secret=True),
        Flag("max_upload_size", max_upload_size, "--max-upload-size", "larger uploads are refused, e.g. 50mb, 2gb",
             commands=commands),
    )


def readable_upload(value: Any, uploaded: Collection[str], upload_dir: Path | str,
                    examples: Collection[str] = ()) -> Path:
    """The file a client's image value names, if the client may read it; else ValueError(NOT_AN_UPLOAD_MESSAGE).

    Readable: a file that Gradio's upload route received (`uploaded`: Gradio's record of them, `upload_file_set`)
    lying inside `upload_dir`, or one of `examples`, or Gradio's cached copy of one (the page sends that copy when
    an example is clicked; it is recognised by its bytes). Gradio's upload route puts each file in a folder named
    by the SHA-256 of its content, so a client can name only an upload whose bytes it has; Gradio's upload route
    does not tell which session sent a file, so "this session's uploads" cannot be checked more closely.

    Why: with `preprocess=False` a value without Gradio's `meta` key (`{"path": "/any/file.png"}` or a bare
    string) reaches the handler unchecked, and `to_rgba` would read any image file on the server.
    """
    import filecmp

    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(NOT_AN_UPLOAD_MESSAGE)
    resolved = Path(os.path.realpath(path))  # symlinks and ".." resolved before any check
    example_paths = [Path(os.path.realpath(example)) for example in examples]
    if resolved in example_paths:
        return resolved
    upload_root = Path(os.path.realpath(upload_dir))
    if resolved.is_relative_to(upload_root) and resolved.is_file():
        if str(path) in uploaded or str(resolved) in uploaded:
            return resolved
        for example in example_paths:  # the page's cached copy of an example: read the example itself
            if example.name == resolved.name and filecmp.cmp(example, resolved, shallow=False):
                return example
    raise ValueError(NOT_AN_UPLOAD_MESSAGE)


class Sessions:
    """What each live session (a browser tab, or a gradio_client `Client`) holds, by Gradio's session hash: the
    run folder its page shows (pruning keeps it) and the stop event of its running job (Stop, or leaving, sets it).

    Gradio's `unload` event (the page's heartbeat connection closed: tab closed, client gone) calls `end`.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._folders: dict[str, Path] = {}
        self._stops: dict[str, threading.Event] = {}

    def show(self, session: str, folder: Path) -> None:
        with self._lock:
            self._folders[session] = Path(folder)

    def shown_folders(self) -> set[Path]:
        with self._lock:
            return set(self._folders.values())

    def start_job(self, session: str) -> threading.Event:
        with self._lock:
            stop = self._stops[session] = threading.Event()
            return stop

    def end_job(self, session: str, stop: threading.Event) -> None:
        with self._lock:
            if self._stops.get(session) is stop:
                del self._stops[session]

    def stop(self, session: str) -> bool:
        """Ask the session's running job to stop at its next step; False when it has none."""
        with self._lock:
            stop = self._stops.get(session)
        if stop is not None:
            stop.set()
        return stop is not None

    def end(self, session: str) -> None:
        self.stop(session)
        with self._lock:
            self._folders.pop(session, None)


def client_error(err: Exception, doing: str) -> str:
    """The message a client gets for an unexpected error: no server path, no handler internals (those go to the
    server log with the traceback), and what to do."""
    logger.exception("Unexpected error while %s", doing)
    return (f"Something went wrong on the server while {doing} ({type(err).__name__}). The details are in the "
            f"server's log. Try again; if it happens again, restart the app and report the log.")


def gradio_cache_schedule(settings) -> tuple[int, int]:
    """Gradio's delete_cache (every, older than) in seconds: GRADIO_CACHE_MAX_AGE_S, or the outputs' age limit."""
    age = GRADIO_CACHE_MAX_AGE_S
    if settings.outputs_max_age_hours > 0:
        age = min(age, settings.outputs_max_age_hours * 3600)
    age = max(1, int(age))
    return max(1, age // 4), age


def launch_options(settings, css: str | None = None) -> dict[str, Any]:
    """`demo.launch` keyword arguments: where to listen, Gradio's own login and upload limit, the page's `css`.

    Gradio serves result files only from the working directory, the system temp dir or `allowed_paths`:
    an outputs folder (`settings.outputs`, where it has one) elsewhere needs it named there.
    """
    outputs = getattr(settings, "outputs", None)
    return dict(server_name=settings.host, server_port=settings.port, auth=settings.auth,
                max_file_size=settings.max_upload_size, allowed_paths=[str(outputs)] if outputs else [],
                show_error=True, css=css)


def network_warning(settings) -> str | None:
    """The start-up warning for an app that anyone on the network can use; None when it is local or has a login."""
    if settings.host not in ("0.0.0.0", "::", "") or settings.auth is not None:
        return None
    return (f"The app listens on {settings.host or '0.0.0.0'}:{settings.port} without a login: anyone who can reach "
            f"this machine can use it and its GPU. Pass --host 127.0.0.1 to keep it on this machine, or "
            f"--auth USER:PASSWORD (or QIL_AUTH) to ask for a login.")


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`, systemd, docker stop) stop the app the way Ctrl+C does: Gradio's launch then closes
    the server, and closing runs its delete_cache clean-up (uploads and result copies). Python's default for
    SIGTERM ends the process at once, leaving Gradio's cache behind."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def delete_gradio_files(demo) -> None:
    """After the server closed: delete the files this app put in Gradio's cache (uploads, result copies).

    Gradio does this in its server's shutdown, but it waits only 5 s for the server thread, and a client still
    connected (an open API client, a browser tab) holds uvicorn's shutdown past that: the process then ended first
    and the uploads stayed on disk. This runs Gradio's own clean-up function once more (files already gone are
    skipped; the example images it keeps for the page stay).
    """
    from gradio.route_utils import delete_files_created_by_app
    from gradio.utils import get_upload_folder

    delete_files_created_by_app(demo, None)
    # Gradio deletes the files, not the folders (named by each file's hash) they sat in: the empty ones go too.
    cache = Path(get_upload_folder())
    for folder in (cache.iterdir() if cache.is_dir() else ()):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
