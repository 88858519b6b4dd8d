"""Real S3 over loopback for tests: a moto server on 127.0.0.1, the environment that points clients at it,
and a fault-injecting TCP proxy to put in front of it.

Everything binds 127.0.0.1 on a free port and runs in daemon threads of the test process; `stop`/`close`
end them. Usage, as a session fixture (tests/conftest.py does the first half)::

    server = MotoServer().start()
    os.environ.update(s3_env(server.endpoint_url))  # Ray workers started afterwards inherit it
    with FaultProxy(server.endpoint_url) as proxy:
        proxy.set_fault("slowdown_503", count=2)  # the next two requests get `503 SlowDown`
        ...  # clients built with endpoint_url=proxy.endpoint_url
    server.stop()

moto keeps its state in module globals: every moto server in one process serves the same buckets, and
`MotoServer.reset` empties all of them. Tests should use their own bucket names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Collection

    from moto.server import ThreadedMotoServer

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
FaultMode = Literal["none", "reset", "truncate", "slowdown_503", "delay", "stall", "trickle", "stopped"]
_MODES = ("none", "reset", "truncate", "slowdown_503", "delay", "stall", "trickle", "stopped")
_MAX_HEAD_BYTES = 64 * 1024
_COPY_CHUNK = 64 * 1024
_POLL_S = 0.05  # how often blocking loops look at their stop flag


class MotoServer:
    """moto's server (S3 and the other services) on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self._endpoint_url: str | None = None

    def start(self) -> MotoServer:
        """Start serving; returns self. Raises RuntimeError if already started."""
        from moto.server import ThreadedMotoServer  # moto is a test extra and slow to import

        if self._server is not None:
            raise RuntimeError(f"MotoServer already serving at {self._endpoint_url}")
        server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self._endpoint_url = f"http://{host}:{port}"
        return self

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:PORT`."""
        if self._endpoint_url is None:
            raise RuntimeError("MotoServer is not started")
        return self._endpoint_url

    def reset(self, *, timeout_s: float = 10.0) -> None:
        """Empty moto's state (all buckets and objects, for every moto server in this process)."""
        parts = urlsplit(self.endpoint_url)
        conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port, timeout=timeout_s)
        try:
            conn.request("POST", "/moto-api/reset")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"moto reset at {self.endpoint_url} answered {response.status}: {body[:200]!r}")

    def stop(self) -> None:
        """Stop serving and join the server thread (idempotent).

        moto answers with `Connection: close`, so its handler threads end with each response; one still
        serving a client that keeps its connection open ends when that client closes it.
        """
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def s3_env(endpoint_url: str) -> dict[str, str]:
    """Environment variables that point boto3, s3fs and pyarrow (and Ray workers, which inherit them) at
    `endpoint_url` with dummy credentials."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        # botocore's own retries off (its default: 5 attempts with backoff): an unreachable endpoint then
        # fails in ~4 s instead of ~30 s; s3fs's and `pipeline.inputs.storage`'s retries still run and are tested
        "AWS_MAX_ATTEMPTS": "1",
    }


@dataclasses.dataclass
class _Fault:
    mode: FaultMode
    left: int
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None
    truncate_at: int
    delay_s: float
    trickle_bytes: int = 16 * 1024


_NO_FAULT = _Fault("none", 0, None, None, 0, 0.0)  # never mutated: set_fault installs a new _Fault


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    target: str  # the request line's target: path and query
    raw: bytes  # head and body as they go upstream (without `Expect`, which the proxy answers itself)
    close: bool  # the client asked to close after the response


class FaultProxy:
    """A loopback TCP proxy in front of an HTTP endpoint that injects S3 faults into the next N requests.

    Modes (see `set_fault`): `none` forwards transparently; `reset` answers a request by resetting the
    connection (RST); `truncate` forwards the response head and the first `truncate_at` bytes of the body,
    then closes the connection; `slowdown_503` answers with S3's XML `503 SlowDown` error without
    forwarding; `delay` waits `delay_s` before forwarding; `stall` forwards the response head, then sends no
    body bytes and holds the connection open until the client closes it, the proxy closes or the fault is set
    again (`heal`, `set_fault`), then closes it; `trickle` forwards the response head, then the body in pieces of
    `trickle_bytes`, waiting `delay_s` before each (slow, but never stalled); `stopped` closes the listening
    socket (and every open connection), so connections are refused until `heal`. Counted modes heal by
    themselves after `count` faults. One thread per client connection, one upstream connection per client connection.
    """

    def __init__(self, upstream_url: str, *, io_timeout_s: float = 10.0) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise ValueError(f"upstream_url must be http://{LOOPBACK}:PORT, got {upstream_url!r}")
        self._upstream = (LOOPBACK, parts.port)
        self._io_timeout_s = io_timeout_s
        self._lock = threading.Lock()  # fault state, counters, open connections, threads
        self._listener_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._port: int | None = None
        self._closed = threading.Event()
        self._fault = _NO_FAULT
        self._generation = 0  # how many times the fault was set: a stall lasts while it stays the same
        self._requests_seen = 0
        self._faults_injected = 0
        self._stalls_given_up: list[float] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread: threading.Thread | None = None
        self._conn_ids = 0

    # -- control ---------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and a free port; returns self."""
        if self._port is not None:
            raise RuntimeError(f"FaultProxy already listening at {self.endpoint_url}")
        self._listener = self._listen(0)
        self._port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"fault-proxy-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        return self

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:PORT` (the port stays the same across `stopped` and `heal`)."""
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://{LOOPBACK}:{self._port}"

    def set_fault(
        self,
        mode: FaultMode,
        *,
        count: int | None = None,
        methods: Collection[str] | None = None,
        paths: Collection[str] | None = None,
        truncate_at: int = 0,
        delay_s: float = 1.0,
        trickle_bytes: int = 16 * 1024,
    ) -> None:
        """Inject `mode` into the next `count` (default 1) requests whose method is in `methods` (default:
        any) and whose target (path and query) contains one of `paths` (default: any).
        A `truncate` fault is spent only on a response whose body is longer than `truncate_at` bytes, a `stall`
        only on a response with a body, a `trickle` only on one with a body of known length.
        `stopped` takes no count: it lasts until `heal` or the next `set_fault`."""
        if mode not in _MODES:
            raise ValueError(f"unknown fault mode {mode!r}")
        if mode == "stopped" and count is not None:
            raise ValueError(f"fault mode 'stopped' lasts until heal(); got count={count}")
        count = 1 if count is None else count
        if count < 0 or truncate_at < 0 or delay_s < 0 or trickle_bytes < 1:
            raise ValueError(
                f"need count, truncate_at, delay_s >= 0 and trickle_bytes >= 1; got {count}, {truncate_at}, "
                f"{delay_s}, {trickle_bytes}"
            )
        wanted = None if methods is None else frozenset(m.upper() for m in methods)
        with self._lock:
            self._fault = _Fault(
                mode, count, wanted, None if paths is None else tuple(paths), truncate_at, delay_s, trickle_bytes
            )
            self._generation += 1  # ends every `stall` in progress
        # The accept loop holds the listener lock nearly all the time (it takes it again at once): take it only
        # when the listener must change, or a heal waits for up to seconds on a loaded machine.
        if (mode == "stopped") != (self._listener is None):
            with self._listener_lock:
                if mode == "stopped" and self._listener is not None:
                    self._listener.close()
                    self._listener = None
                elif mode != "stopped" and self._listener is None and self._port is not None:
                    self._listener = self._listen(self._port)
        if mode == "stopped":
            self._shutdown_connections()

    def heal(self) -> None:
        """Back to transparent forwarding (and listening again after `stopped`)."""
        self.set_fault("none")

    @property
    def faults_left(self) -> int:
        """How many more requests the current counted fault will hit (0 once healed)."""
        with self._lock:
            return self._fault.left if self._fault.mode not in ("none", "stopped") else 0

    @property
    def faults_injected(self) -> int:
        """Faults injected since start (a `stopped` period is not counted)."""
        with self._lock:
            return self._faults_injected

    @property
    def stalls_given_up_s(self) -> list[float]:
        """How long each `stall` that its client gave up (closed the connection) was held, in seconds."""
        with self._lock:
            return list(self._stalls_given_up)

    @property
    def requests_seen(self) -> int:
        """Requests received from clients since start, faulted or not."""
        with self._lock:
            return self._requests_seen

    def close(self, *, join_timeout_s: float = 5.0) -> None:
        """Stop listening, cut every connection and join every thread (idempotent)."""
        self._closed.set()
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        if self._accept_thread is not None:
            self._accept_thread.join(join_timeout_s)  # after this no connection is accepted or spawned
        self._shutdown_connections()
        with self._lock:
            threads = [t for t in (self._accept_thread, *self._threads) if t is not None]
        for thread in threads:
            thread.join(join_timeout_s)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"FaultProxy threads still alive after {join_timeout_s}s: {alive}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(64)
        listener.settimeout(_POLL_S)
        return listener

    def _shutdown_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._listener_lock:
                listener = self._listener
                conn = None
                if listener is not None:
                    try:
                        conn, _ = listener.accept()  # waits at most _POLL_S
                    except (TimeoutError, BlockingIOError):
                        pass
                    else:
                        self._track(conn, add=True)  # under the listener lock, so close() cannot miss it
            if listener is None:
                self._closed.wait(_POLL_S)
            elif conn is not None:
                conn.settimeout(self._io_timeout_s)
                self._conn_ids += 1
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"fault-proxy-conn-{self._conn_ids}", daemon=True
                )
                with self._lock:
                    self._threads = [t for t in self._threads if t.is_alive()]
                    self._threads.append(thread)
                thread.start()

    def _take_fault(self, request: _Request, *, phase: Literal["request", "response"], body_len: int | None) -> _Fault:
        """The fault due on this request at this phase, spending one (`_NO_FAULT` if none is due)."""
        with self._lock:
            self._requests_seen += phase == "request"
            fault = self._fault
            if fault.mode in ("none", "stopped") or fault.left <= 0:
                return _NO_FAULT
            if (phase == "response") != (fault.mode in ("truncate", "stall", "trickle")):  # after the head
                return _NO_FAULT
            if fault.methods is not None and request.method not in fault.methods:
                return _NO_FAULT
            if fault.paths is not None and not any(p in request.target for p in fault.paths):
                return _NO_FAULT
            if fault.mode == "truncate" and body_len is not None and body_len <= fault.truncate_at:
                return _NO_FAULT  # nothing to cut
            if fault.mode == "stall" and body_len == 0:
                return _NO_FAULT  # no body to hold back
            if fault.mode == "trickle" and not body_len:
                return _NO_FAULT  # no body, or one of unknown length
            fault.left -= 1
            self._faults_injected += 1
            if fault.left == 0:
                self._fault = _NO_FAULT
            logger.debug("fault proxy: %s on %s %s (%d left)", fault.mode, request.method, request.target, fault.left)
            return dataclasses.replace(fault, left=1)

    def _serve(self, client: socket.socket) -> None:
        """Relay requests of one client connection, one at a time, injecting the faults that are due."""
        upstream: socket.socket | None = None
        up_reader: BinaryIO | None = None
        reader = client.makefile("rb")
        try:
            while not self._closed.is_set():
                request = _read_request(reader, client)
                if request is None:
                    return
                fault = self._take_fault(request, phase="request", body_len=None)
                if fault.mode == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if fault.mode == "slowdown_503":
                    client.sendall(_slowdown_response(request.method))
                    if request.close:
                        return
                    continue
                if fault.mode == "delay" and self._closed.wait(fault.delay_s):
                    return
                if upstream is None:
                    upstream = socket.create_connection(self._upstream, timeout=self._io_timeout_s)
                    self._track(upstream, add=True)
                    up_reader = upstream.makefile("rb")
                    if self._closed.is_set():
                        return
                assert up_reader is not None
                upstream.sendall(request.raw)
                if not self._relay_response(request, up_reader, client):
                    return
        except (OSError, ValueError) as e:  # the peer went away, timed out or spoke garbage
            logger.debug("fault proxy connection ended: %r", e)
        finally:
            reader.close()
            for sock in (client, upstream):
                if sock is not None:
                    self._track(sock, add=False)
                    sock.close()
            if up_reader is not None:
                up_reader.close()

    def _relay_response(self, request: _Request, up_reader: BinaryIO, client: socket.socket) -> bool:
        """Copy one response to the client, cutting it if a `truncate` fault is due; True to keep going."""
        head = _read_head(up_reader)
        while head is not None and _status(head) // 100 == 1:  # interim responses
            client.sendall(head)
            head = _read_head(up_reader)
        if head is None:
            raise ConnectionError("upstream closed the connection before responding")
        headers = _headers(head)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if request.method == "HEAD" or _status(head) in (204, 304):
            body_len: int | None = 0
        elif chunked or "content-length" not in headers:
            body_len = None
        else:
            body_len = int(headers["content-length"])
        with self._lock:
            generation = self._generation
        fault = self._take_fault(request, phase="response", body_len=body_len)
        client.sendall(head)
        if fault.mode == "stall":
            self._hold(client, generation)
            _shutdown(client)
            return False
        if fault.mode == "trickle":
            assert body_len is not None
            for start in range(0, body_len, fault.trickle_bytes):
                if self._closed.wait(fault.delay_s):
                    return False
                _copy(up_reader, client, min(fault.trickle_bytes, body_len - start), until_eof=False)
            return not request.close and headers.get("connection", "").lower() != "close"
        if fault.mode == "truncate":
            _copy(up_reader, client, fault.truncate_at, until_eof=False)
            _shutdown(client)
            return False
        if chunked:
            client.sendall(_read_chunked(up_reader))
        elif body_len is None:  # delimited by the end of the connection
            _copy(up_reader, client, 0, until_eof=True)
            return False
        else:
            _copy(up_reader, client, body_len, until_eof=False)
        return not request.close and headers.get("connection", "").lower() != "close"

    def _hold(self, client: socket.socket, generation: int) -> None:
        """Send nothing until the client closes its end, the proxy closes or the fault is set again."""
        start = time.monotonic()
        while not self._closed.wait(_POLL_S):
            with self._lock:
                if self._generation != generation:
                    return
            readable, _, _ = select.select([client], [], [], 0)
            if readable and not client.recv(1, socket.MSG_PEEK):  # the client gave up and closed
                with self._lock:
                    self._stalls_given_up.append(time.monotonic() - start)
                return


def _read_head(reader: BinaryIO, *, trailers: bool = False) -> bytes | None:
    """Read an HTTP message head (start line and headers, through the blank line), or with `trailers` the
    trailer section of a chunked body (possibly just the blank line); None at a clean EOF before a head."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = reader.readline(_MAX_HEAD_BYTES + 1)
        if not line:
            if lines or trailers:
                raise ConnectionError("connection closed inside an HTTP head")
            return None
        size += len(line)
        if size > _MAX_HEAD_BYTES:
            raise ValueError(f"HTTP head longer than {_MAX_HEAD_BYTES} bytes")
        if not lines and not trailers and line in (b"\r\n", b"\n"):
            continue  # stray CRLF between messages
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _headers(head: bytes) -> dict[str, str]:
    """Header names (lower case) -> values of a message head; repeated headers keep the last value."""
    out: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _read_request(reader: BinaryIO, client: socket.socket) -> _Request | None:
    """Read one whole request (None at a clean EOF), answering `Expect: 100-continue` on the way."""
    head = _read_head(reader)
    if head is None:
        return None
    method, _, rest = head.partition(b" ")
    headers = _headers(head)
    if headers.get("expect", "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(reader)
    else:
        length = int(headers.get("content-length", "0"))
        body = reader.read(length)
        if len(body) != length:
            raise ConnectionError(f"client closed after {len(body)} of {length} body bytes")
    close = headers.get("connection", "").lower() == "close" or rest.rstrip().endswith(b"HTTP/1.0")
    target = rest.split(b" ", 1)[0].decode("latin-1")
    return _Request(method.decode("ascii").upper(), target, head + body, close)


def _read_chunked(reader: BinaryIO) -> bytes:
    """Read a chunked body, returning it still chunk-encoded (through the trailers' blank line)."""
    parts: list[bytes] = []
    while True:
        size_line = reader.readline(_MAX_HEAD_BYTES)
        if not size_line.endswith(b"\n"):
            raise ConnectionError("connection closed inside a chunked body")
        parts.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            parts.append(_read_head(reader, trailers=True) or b"")  # trailers and the final blank line
            return b"".join(parts)
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed inside a chunk")
        parts.append(data)


def _copy(reader: BinaryIO, sock: socket.socket, nbytes: int, *, until_eof: bool) -> None:
    """Copy exactly `nbytes` (or, with `until_eof`, everything up to EOF) from `reader` to `sock`."""
    left = nbytes
    while until_eof or left > 0:
        data = reader.read1(_COPY_CHUNK if until_eof else min(left, _COPY_CHUNK))  # type: ignore[attr-defined]
        if not data:
            if until_eof:
                return
            raise ConnectionError(f"upstream closed with {left} of {nbytes} body bytes unsent")
        sock.sendall(data)
        left -= len(data)


def _shutdown(sock: socket.socket) -> None:
    """Close both directions now (wakes a thread blocked on the socket); the owner still closes it."""
    with contextlib.suppress(OSError):  # already closed or never connected
        sock.shutdown(socket.SHUT_RDWR)


def _slowdown_response(method: str) -> bytes:
    """S3's `503 SlowDown` error, as Amazon S3 sends it (XML body, no body for HEAD)."""
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
        b"<RequestId>FAULTPROXY0000001</RequestId><HostId>fault-proxy</HostId></Error>"
    )
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-amz-request-id: FAULTPROXY0000001\r\n"
        "\r\n"
    ).encode("ascii")
    return head if method == "HEAD" else head + body


@contextlib.contextmanager
def proxied_s3(upstream_url: str, monkeypatch: Any, *, bucket: str) -> Iterator[FaultProxy]:
    """A fault proxy of its own in front of the S3 endpoint ``upstream_url``, through which every S3 client made
    inside the block goes (``AWS_ENDPOINT_URL*`` set with ``monkeypatch``, s3fs's instance cache cleared), with
    ``bucket`` created; for a test fixture."""
    import boto3
    import s3fs

    client = boto3.client("s3")
    if bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=bucket)
    with FaultProxy(upstream_url) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint_url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint_url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield fault_proxy
    s3fs.S3FileSystem.clear_instance_cache()
