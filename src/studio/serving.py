"""Serving the page on a network: who may read which file (`readable_upload`), sessions and their Stop
events, the clients still listening (`Connections`), Gradio's launch options and its cache (one folder per process,
`process_cache_dir`), what Gradio leaves open (`ServingGuard`), the network warning, SIGTERM. Shared by the app and
both tools; no torch.
"""

import argparse
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from studio.params import Flag, positive_int

logger = logging.getLogger(__name__)

LAN_HOST = "0.0.0.0"  # every interface: the app and the tools are reachable from the LAN unless told otherwise
# Gradio's cache (uploads, and the copies of results it serves to the page) is deleted by Gradio's own
# delete_cache after this long, or after OUTPUTS_MAX_AGE_HOURS when that is shorter.
GRADIO_CACHE_MAX_AGE_S = 3600
# The one answer for any file a client may not read, whether or not it exists (so it reveals nothing).
NOT_AN_UPLOAD_MESSAGE = ("This image was not uploaded to this app (or it was cleaned from its upload cache): upload "
                         "the image again, or pick one of the examples.")
# A request body larger than this is refused before it is read (uploads excepted: Gradio's upload route streams them
# to disk under --max-upload-size). The largest a page or API client sends is a job's values: two 2,000-character
# prompts and a file reference, ~30 KB at worst (every character escaped in JSON); a 1 MB prompt still reaches the
# prompt's own check and its message.
MAX_REQUEST_BYTES = 2_000_000
# Jobs one session may have queued or running on one worker (the app's GPU): a job and the next one. Without a limit
# one client queued twenty and everyone else waited behind them.
MAX_QUEUED_JOBS_PER_SESSION = 2
# A running job whose client has had no connection open for this long (no heartbeat, no stream of its results) is
# stopped: a raw API client that posted a job and never listened, or one that went away mid-run.
CLIENT_GONE_S = 5.0
# SIGTERM or Ctrl+C during a run: the run is asked to stop at its next step and the process waits this long for it.
SHUTDOWN_WAIT_S = 120.0
# Gradio's cache (uploads, and its copies of the results it serves) lives in the outputs folder, one folder per
# process, named by the process (pid and start time): a start-up deletes those of processes no longer running.
GRADIO_CACHE_DIR = ".gradio-cache"


def parse_auth(text: str) -> tuple[str, str]:
    """argparse `type=` for --auth / QIL_AUTH: USER:PASSWORD, both non-empty."""
    user, _, password = text.partition(":")
    if not user or not password:
        raise argparse.ArgumentTypeError("write USER:PASSWORD, both non-empty (e.g. --auth alice:s3cret)")
    return user, password


def parse_hosts(text: str) -> tuple[str, ...]:
    """argparse `type=` for --allowed-hosts / QIL_ALLOWED_HOSTS: host names, comma-separated."""
    names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
    if not names or any(not re.fullmatch(r"[a-z0-9.-]+", name) for name in names):
        raise argparse.ArgumentTypeError("write host names, comma-separated (e.g. --allowed-hosts studio.example.org)")
    return names


def serving_flags(host: str, port: int, max_upload_size: str, commands: tuple[str, ...]) -> tuple[Flag, ...]:
    """The flags of a served page (the app's and the tools'): where it listens, its login, its upload limit, the host
    names it answers to."""
    return (
        Flag("host", host, "--host", "the address to listen on; 127.0.0.1 keeps it on this machine", commands=commands),
        Flag("port", port, "--port", "the port to listen on", type=positive_int, commands=commands),
        Flag("auth", None, "--auth", "ask for this login (Gradio's auth); QIL_AUTH keeps it off the command line",
             type=parse_auth, metavar="USER:PASSWORD", commands=commands, secret=True),
        Flag("max_upload_size", max_upload_size, "--max-upload-size", "larger uploads are refused, e.g. 50mb, 2gb",
             commands=commands),
        Flag("allowed_hosts", (), "--allowed-hosts", "host names the page answers to besides IP addresses, localhost "
             "and this machine's name (e.g. a reverse proxy's name), comma-separated", type=parse_hosts,
             metavar="NAME,...", commands=commands),
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


class Connections:
    """The connections by which each session's client listens now (Gradio's heartbeat, its queue's stream of results,
    a raw client's /call/ result stream), counted by `ServingGuard` as each request starts and ends: Gradio's own
    `unload` event needs a heartbeat, which raw API clients never open."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._closed_at: dict[str, float] = {}
        self.guarded = False  # a ServingGuard counts them (servers launched without `launch_options` have none)

    def opened(self, session: str) -> None:
        with self._lock:
            self._open[session] = self._open.get(session, 0) + 1
            self._closed_at.pop(session, None)

    def closed(self, session: str) -> None:
        with self._lock:
            self._open[session] = self._open.get(session, 1) - 1
            if self._open[session] <= 0:
                del self._open[session]
                now = self._closed_at[session] = time.monotonic()
                if len(self._closed_at) > 10_000:  # every raw call is a session of its own: forget the old ones
                    self._closed_at = {s: t for s, t in self._closed_at.items() if now - t < 3600}

    def listening(self, session: str) -> bool:
        with self._lock:
            return session in self._open

    def quiet_since(self, session: str, since: float) -> float | None:
        """Seconds since the session last listened (or since `since`, a job's start, when it has not since): None while
        it listens."""
        with self._lock:
            if session in self._open:
                return None
            return time.monotonic() - max(since, self._closed_at.get(session, since))


CONNECTIONS = Connections()  # one per process: Gradio's session hashes are random, so servers in one process share it


class Sessions:
    """What each session (a browser tab, a gradio_client `Client`, a raw API call) holds, by Gradio's session hash: the
    run folder its page shows and the stop event of its running job (Stop, or leaving, sets it).

    A session is live while its client listens (`CONNECTIONS`) or its job runs: pruning keeps the run folders of live
    sessions only, so a raw client's folder is released when its job ends, a page's when it closes (Gradio's `unload`
    calls `end` too). A job whose client stopped listening for CLIENT_GONE_S is stopped by a watcher thread.
    """

    def __init__(self, connections: Connections = CONNECTIONS):
        self._lock = threading.Lock()
        self._folders: dict[str, Path] = {}
        self._stops: dict[str, threading.Event] = {}
        self._started: dict[str, float] = {}
        self._connections = connections
        self._watcher: threading.Thread | None = None

    def show(self, session: str, folder: Path) -> None:
        with self._lock:
            self._folders[session] = Path(folder)
            if len(self._folders) > 1000:  # every raw call is a session: forget those gone for an hour
                self._folders = {s: f for s, f in self._folders.items()
                                 if s in self._stops or (self._connections.quiet_since(s, 0.0) or 0) < 3600}

    def live(self, session: str) -> bool:
        with self._lock:
            running = session in self._stops
        return running or self._connections.listening(session)

    def shown_folders(self) -> set[Path]:
        """The run folders that live sessions show (a page whose heartbeat reconnects is live again)."""
        with self._lock:
            shown = dict(self._folders)
        return {folder for session, folder in shown.items() if self.live(session)}

    def start_job(self, session: str) -> threading.Event:
        with self._lock:
            stop = self._stops[session] = threading.Event()
            self._started[session] = time.monotonic()
            if self._watcher is None and self._connections.guarded:
                self._watcher = threading.Thread(target=self._watch, name="client-gone watcher", daemon=True)
                self._watcher.start()
            return stop

    def end_job(self, session: str, stop: threading.Event) -> None:
        with self._lock:
            if self._stops.get(session) is stop:
                del self._stops[session]
                del self._started[session]

    def stop(self, session: str) -> bool:
        """Ask the session's running job to stop at its next step; False when it has none."""
        with self._lock:
            stop = self._stops.get(session)
        if stop is not None:
            stop.set()
        return stop is not None

    def stop_all(self) -> int:
        """Ask every running job to stop (the app is shutting down); returns how many there were."""
        with self._lock:
            stops = list(self._stops.values())
        for stop in stops:
            stop.set()
        return len(stops)

    def end(self, session: str) -> None:
        self.stop(session)
        with self._lock:
            self._folders.pop(session, None)

    def _watch(self) -> None:
        """Stop the jobs whose client has not listened for CLIENT_GONE_S (checked twice a second)."""
        while True:
            time.sleep(0.5)
            with self._lock:
                running = [(session, stop, self._started[session]) for session, stop in self._stops.items()]
            for session, stop, started in running:
                quiet = self._connections.quiet_since(session, started)
                if quiet is not None and quiet > CLIENT_GONE_S and not stop.is_set():
                    logger.info("Stopping the job of session %s: its client has not listened for %.0f s",
                                session[:8], quiet)
                    stop.set()


def client_error(err: Exception, doing: str) -> str:
    """The message a client gets for an unexpected error: no server path, no handler internals (those go to the
    server log with the traceback), and what to do."""
    logger.exception("Unexpected error while %s", doing)
    return (f"Something went wrong on the server while {doing} ({type(err).__name__}). The details are in the "
            f"server's log. Try again; if it happens again, restart the app and report the log.")


def process_cache_dir(outputs: Path | str) -> Path:
    """This process's folder for Gradio's cache: OUTPUTS/.gradio-cache/<pid>-<start time> (`clean_gradio_caches`)."""
    import psutil

    return Path(outputs) / GRADIO_CACHE_DIR / f"{os.getpid()}-{int(psutil.Process().create_time())}"


def use_process_cache(outputs: Path | str) -> None:
    """Point Gradio's cache at this process's folder (GRADIO_TEMP_DIR, read when gradio is imported and its components
    are made: call before either). A GRADIO_TEMP_DIR set by the user is kept."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(process_cache_dir(outputs)))


def clean_gradio_caches(outputs: Path | str) -> list[Path]:
    """At start-up: delete what no running process owns in OUTPUTS/.gradio-cache (the folders of processes that were
    killed, and anything an older version left there), so a killed server's uploads and result copies do not stay."""
    import psutil

    root = Path(outputs) / GRADIO_CACHE_DIR
    if not root.is_dir():
        return []
    deleted = []
    for entry in root.iterdir():
        owner = re.fullmatch(r"(\d+)-(\d+)", entry.name)
        if owner:
            try:
                alive = abs(psutil.Process(int(owner[1])).create_time() - int(owner[2])) < 2
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                alive = False
            if alive:
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        deleted.append(entry)
    return deleted


def remove_process_cache() -> None:
    """At exit: delete this process's cache folder whole (uploads, result copies, Gradio's copies of the examples)."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder())
    if re.fullmatch(r"\d+-\d+", folder.name) and folder.parent.name == GRADIO_CACHE_DIR:
        shutil.rmtree(folder, ignore_errors=True)


def served_file(path: Path | str) -> str:
    """The copy of a result file that the page and API clients are given: Gradio's own cached copy (in its cache, in a
    folder named by a keyed SHA-256 of the bytes, so nobody can name it without the file), made here so that the
    outputs folder itself is never served (`launch_options` names no allowed path)."""
    from gradio.processing_utils import save_file_to_cache
    from gradio.utils import get_upload_folder

    return save_file_to_cache(path, get_upload_folder())


def gradio_cache_schedule(settings) -> tuple[int, int]:
    """Gradio's delete_cache (every, older than) in seconds: GRADIO_CACHE_MAX_AGE_S, or the outputs' age limit."""
    age = GRADIO_CACHE_MAX_AGE_S
    if getattr(settings, "outputs_max_age_hours", 0) > 0:
        age = min(age, settings.outputs_max_age_hours * 3600)
    age = max(1, int(age))
    return max(1, age // 4), age


def launch_options(settings, css: str | None = None) -> dict[str, Any]:
    """`demo.launch` keyword arguments: where to listen, Gradio's own login and upload limit, the page's `css`, and
    `ServingGuard` in front of Gradio's routes.

    No allowed paths: results reach clients as Gradio's cached copies (`served_file`), so nothing of the outputs
    folder (run folders, params.json) is served. FastAPI's own /openapi.json is off (Gradio serves its API description
    at /gradio_api/openapi.json, behind the login).
    """
    from starlette.middleware import Middleware

    guard = Middleware(ServingGuard, host=settings.host, allowed_hosts=getattr(settings, "allowed_hosts", ()) or ())
    return dict(server_name=settings.host, server_port=settings.port, auth=settings.auth,
                max_file_size=settings.max_upload_size, allowed_paths=[], show_error=True, css=css,
                app_kwargs=dict(middleware=[guard], openapi_url=None))


def network_warning(settings) -> str | None:
    """The start-up warning for an app that anyone on the network can use; None when it is local or has a login."""
    if settings.host not in ("0.0.0.0", "::", "") or settings.auth is not None:
        return None
    return (f"The app listens on {settings.host or '0.0.0.0'}:{settings.port} without a login: anyone who can reach "
            f"this machine can use it and its GPU. Pass --host 127.0.0.1 to keep it on this machine, or "
            f"--auth USER:PASSWORD (or QIL_AUTH) to ask for a login.")


# Gradio 6.31's routes that answer without its login (no `login_check`): a client with no login could keep any
# session's heartbeat (and end it), cancel events or run the start-up events. (Gradio's `launch` calls startup-events
# itself, without a login, once: that first call passes.)
OPEN_ROUTES = re.compile(r"/gradio_api/(heartbeat/[^/]+|reset|cancel|startup-events)/?$")
HEARTBEAT_ROUTE = re.compile(r"/gradio_api/heartbeat/([^/]+)/?$")
RESULT_STREAM_ROUTE = re.compile(r"/gradio_api/call/(?:v2/)?[^/]+/([^/]+)/?$")
JOB_ROUTES = re.compile(r"/gradio_api/(queue/join|call/(?:v2/)?([^/]+)|run/([^/]+)|api/([^/]+))/?$")
UPLOAD_ROUTE = re.compile(r"/gradio_api/upload/?$")


class ServingGuard:
    """ASGI middleware in front of Gradio's routes (`launch_options` installs it): what Gradio leaves open.

    - Host: a request naming a host other than an IP address, localhost, this machine's name, --host or
      --allowed-hosts is refused (400): a web page whose own name resolves to this machine (DNS rebinding) would
      otherwise drive the app from its visitor's browser.
    - Origin: a POST from a page of another origin is refused (403): a browser sends a multipart upload to any site
      without asking it first (no CORS preflight), and Gradio would store it.
    - Login: with --auth, the routes Gradio serves without its login (OPEN_ROUTES) ask for it too (401).
    - Size: a request body over MAX_REQUEST_BYTES is refused before it is read (413). Gradio's max_file_size covers
      only its upload route; FastAPI's own max_body_size is one limit for every route, so it would cap uploads at the
      size of a JSON request (Gradio's routes take no limit of their own).
    - Jobs: a session with MAX_QUEUED_JOBS_PER_SESSION jobs queued or running on one worker gets no more (429); a
      file value (Gradio's `meta` key) whose path is not an absolute path of this server is refused before Gradio
      reads it (Gradio fetches URLs, and its error for a relative path names the server's working directory).
    - Listeners: the heartbeat, queue and result streams are counted per session in `CONNECTIONS` while they are open.
    """

    def __init__(self, app, host: str = "", allowed_hosts: Collection[str] = ()):
        self.app = app
        # (No getfqdn: a reverse lookup can hang the first request where DNS is slow; --allowed-hosts adds names.)
        names = {"localhost", socket.gethostname(), f"{socket.gethostname()}.local", host}
        self.allowed_hosts = {name.lower() for name in [*names, *allowed_hosts] if name}
        CONNECTIONS.guarded = True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if not self.host_allowed(headers.get("host")):
            return await self.refuse(scope, send, 400, "Invalid host header: this server answers to its IP addresses, "
                                                       "localhost and its own name (add others with --allowed-hosts)")
        origin = headers.get("origin")
        if (origin is not None and method not in ("GET", "HEAD", "OPTIONS")
                and urlsplit(origin).netloc.lower() != (headers.get("host") or "").lower()):
            return await self.refuse(scope, send, 403, "Cross-origin request refused: use the page this server serves")
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        if OPEN_ROUTES.search(path) and not self.logged_in(scope) and not self.launching(scope, path):
            return await self.refuse(scope, send, 401, "Not authenticated")
        if method in ("POST", "PUT", "PATCH", "DELETE") and not UPLOAD_ROUTE.search(path):
            body = await self.read_body(scope, receive, send, headers)
            if body is None:
                return
            if JOB_ROUTES.search(path) and (refusal := self.check_job(scope, path, body)):
                return await self.refuse(scope, send, *refusal)
            receive = replay(body, receive)
        session = self.listening_session(scope, path)
        if session is None:
            return await self.app(scope, receive, send)
        CONNECTIONS.opened(session)
        try:
            await self.app(scope, receive, send)
        finally:
            CONNECTIONS.closed(session)

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            return False
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
            return True  # an address: no DNS name that a rebinding page could own
        except ValueError:
            return name in self.allowed_hosts or name.endswith(".localhost")

    @staticmethod
    def logged_in(scope) -> bool:
        """Gradio's own login check (its access-token cookie), for the routes it leaves open."""
        from starlette.requests import HTTPConnection

        app = scope.get("app")
        if getattr(app, "auth", None) is None:
            return True
        cookies = HTTPConnection(scope).cookies
        token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
        return app.tokens.get(token) is not None

    @staticmethod
    def launching(scope, path: str) -> bool:
        """Gradio's `launch` asking for the start-up events (once, before anyone else could)."""
        return path.rstrip("/").endswith("/startup-events") and not getattr(scope.get("app"), "startup_events_triggered",
                                                                            True)

    async def read_body(self, scope, receive, send, headers) -> bytes | None:
        """The whole body, at most MAX_REQUEST_BYTES; None when a refusal was sent instead."""
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_REQUEST_BYTES):
            await self.refuse(scope, send, 413, f"Request too large: the limit is {MAX_REQUEST_BYTES:,} bytes "
                                                f"(uploads go through the upload route, up to --max-upload-size)")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_REQUEST_BYTES:
                await self.refuse(scope, send, 413, f"Request too large: the limit is {MAX_REQUEST_BYTES:,} bytes")
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def check_job(scope, path: str, body: bytes) -> tuple[int, str] | None:
        """A job request's refusal (status, message), or None: a file value that is no path of this server, or a
        session that has MAX_QUEUED_JOBS_PER_SESSION jobs waiting or running on the worker this one needs."""
        try:
            request = json.loads(body)
        except ValueError:
            return None  # Gradio answers malformed JSON itself
        if not isinstance(request, dict):
            return None
        if any(not os.path.isabs(value) for value in file_value_paths(request.get("data"))):
            return 400, NOT_AN_UPLOAD_MESSAGE
        session = request.get("session_hash")
        blocks = getattr(scope.get("app"), "blocks", None)
        if not isinstance(session, str) or blocks is None:
            return None  # a call without a session is a session of its own: one job
        api_name = next((name for name in JOB_ROUTES.search(path).groups()[1:] if name), None)
        index = request.get("fn_index")
        fn = (blocks.fns.get(index) if isinstance(index, int) else
              next((fn for fn in blocks.fns.values() if api_name and fn.api_name == api_name), None))
        if fn is None or queued_jobs(blocks, session, fn.concurrency_id) < MAX_QUEUED_JOBS_PER_SESSION:
            return None
        return 429, (f"This session already has {MAX_QUEUED_JOBS_PER_SESSION} jobs waiting or running (the limit per "
                     f"session): wait for one to finish.")

    @staticmethod
    def listening_session(scope, path: str) -> str | None:
        """The session a heartbeat, queue stream or result stream listens for; None for any other request."""
        if scope.get("method") != "GET":
            return None
        if match := HEARTBEAT_ROUTE.search(path):
            return match[1]
        if path.rstrip("/").endswith("/gradio_api/queue/data"):
            return (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash") or [None])[0]
        if match := RESULT_STREAM_ROUTE.search(path):  # a raw /call/ client: its event names the session
            queue = getattr(getattr(scope.get("app"), "blocks", None), "_queue", None)
            event = getattr(queue, "event_ids_to_events", {}).get(match[1])
            return getattr(event, "session_hash", None) or match[1]
        return None

    @staticmethod
    async def refuse(scope, send, status: int, message: str) -> None:
        logger.info("Refused %s %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"), message)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive):
    """An ASGI `receive` that gives `body` once, then the client's own messages (its disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again


def file_value_paths(data: Any) -> list[str]:
    """The paths of the file values (dicts with Gradio's `meta` key) anywhere in a request's data."""
    found: list[str] = []
    if isinstance(data, dict):
        if isinstance(data.get("meta"), dict) and data["meta"].get("_type") == "gradio.FileData":
            found.append(str(data.get("path", "")))
        for value in data.values():
            found += file_value_paths(value)
    elif isinstance(data, list):
        for value in data:
            found += file_value_paths(value)
    return found


def queued_jobs(blocks, session: str, concurrency_id: str) -> int:
    """The session's jobs queued or running on one worker (`concurrency_id`). Gradio 6.31 keeps them in its queue's
    records (`_queue.event_ids_to_events`, until a job ends); no public API says it."""
    events = list(getattr(getattr(blocks, "_queue", None), "event_ids_to_events", {}).values())
    return sum(1 for event in events if event.session_hash == session and event.concurrency_id == concurrency_id)


def stop_on_sigterm(first: Callable[[], Any] | None = None) -> None:
    """Make SIGTERM (`kill`, systemd, docker stop) stop the app the way Ctrl+C does: Gradio's launch then closes
    the server, and closing runs its delete_cache clean-up (uploads and result copies). Python's default for
    SIGTERM ends the process at once, leaving Gradio's cache behind. `first` runs before (the app stops its running
    job there, so the job ends while Gradio closes)."""
    import signal

    def interrupt(signum, frame):
        if first is not None:
            first()
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
