"""Byte relays between unix sockets and TCP, to bridge services across the sandbox's network namespace.

A workspace has its own network namespace (only loopback), so the hub and the single-user server
meet through unix sockets in the runtime folder, bound at ``/run/ngp`` inside and at
``$NGP_HOME/runtime/<project>/<user>`` outside::

    outside (hub, root)                                      inside (member's uid)
    hub API 127.0.0.1:8081 <- UnixToTcp  <- hub.sock    <- TcpToUnix 127.0.0.1:8081 <- singleuser server
    proxy -> TcpToUnix 127.0.0.1:<port>  -> server.sock <- jupyter server (ServerApp.sock, mode 0600)
    audit service (its own socket)       <- audit/audit.sock <- kernels, Dask workers, the server's contents
                                                            <- TcpToUnix 127.0.0.1:8082 <- other HTTP clients

Who creates which socket: ``hub.sock`` is created by the hub outside (its :class:`UnixToTcp` with
``owner=<member uid>``, mode 0600); ``server.sock`` by the single-user server inside, as the member,
mode 0600 (``ServerApp.sock_mode``); ``audit/audit.sock`` by the audit service itself, in its own
folder (``$NGP_HOME/run/audit``, bound read-only at ``/run/ngp/audit``), so no audit record passes
through the hub's process. Nothing else creates sockets there.

The relays copy bytes both ways and know nothing of HTTP, so websockets pass unchanged. Use them in a
running asyncio loop (``await relay.start()``, ``await relay.stop()``) or from the command line::

    python -m ngp_research.workspace.bridge tcp-to-unix 127.0.0.1:8081 /run/ngp/hub.sock
    python -m ngp_research.workspace.bridge unix-to-tcp /run/ngp/hub.sock 127.0.0.1:8081
"""

import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys

CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError, asyncio.CancelledError):
        writer.close()


class _Relay:
    """Accepts connections and relays each to a freshly opened upstream connection."""

    def __init__(self):
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _connect_upstream(self):
        raise NotImplementedError

    async def _handle(self, reader, writer):
        task = asyncio.current_task()
        self._tasks.add(task)
        up_writer = None
        try:
            try:
                up_reader, up_writer = await self._connect_upstream()
            except OSError:
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._tasks.discard(task)

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def serve_forever(self) -> None:
        await self.start()
        await self._server.serve_forever()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()


class UnixToTcp(_Relay):
    """Listens on the unix socket ``path`` (mode 0600, owned by ``owner`` if given) and relays to ``host:port``.

    The socket is created with a restrictive umask, so it is never connectable by others, even briefly.
    An existing socket at ``path`` is replaced; any other kind of file there is an error.
    """

    def __init__(self, path: str, host: str, port: int, owner: int | None = None, group: int | None = None,
                 mode: int = 0o600):
        super().__init__()
        self.path, self.host, self.port = str(path), host, int(port)
        self.owner, self.group, self.mode = owner, group, mode

    async def _connect_upstream(self):
        return await asyncio.open_connection(self.host, self.port)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        if self.owner is not None or self.group is not None:
            os.chown(self.path, -1 if self.owner is None else self.owner, -1 if self.group is None else self.group,
                     follow_symlinks=False)
        os.chmod(self.path, self.mode)  # just bound by us in a folder only root writes (see the spawner)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock, limit=CHUNK)

    async def stop(self) -> None:
        await super().stop()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class TcpToUnix(_Relay):
    """Listens on ``host:port`` (port 0: any free port, see :attr:`port`) and relays to the unix socket ``path``."""

    def __init__(self, path: str, host: str = "127.0.0.1", port: int = 0, owner: int | None = None):
        super().__init__()
        self.path, self.host, self.port = str(path), host, int(port)
        self.owner = owner  # when set: connect only to a socket (not a symlink) owned by this uid

    async def _connect_upstream(self):
        if self.owner is None:
            return await asyncio.open_unix_connection(self.path, limit=CHUNK)
        # The relay runs as root and the socket's folder belongs to the member: never follow a link they
        # planted to another socket (another workspace's server, a daemon's control socket).
        fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != self.owner:
                raise ConnectionRefusedError(f"{self.path} is not a socket owned by uid {self.owner}")
            return await asyncio.open_unix_connection(f"/proc/self/fd/{fd}", limit=CHUNK)
        finally:
            os.close(fd)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=CHUNK,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port).

    >>> parse_address("127.0.0.1:8081")
    ('127.0.0.1', 8081)
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def relay_from_args(kind: str, a: str, b: str) -> _Relay:
    """``tcp-to-unix HOST:PORT PATH`` or ``unix-to-tcp PATH HOST:PORT``."""
    if kind == "tcp-to-unix":
        host, port = parse_address(a)
        return TcpToUnix(b, host, port)
    if kind == "unix-to-tcp":
        host, port = parse_address(b)
        return UnixToTcp(a, host, port)
    raise ValueError(f"unknown relay {kind!r} (tcp-to-unix or unix-to-tcp)")


async def _serve(relays) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for r in relays:
        await r.start()
    try:
        await stop.wait()
    finally:
        for r in relays:
            await r.stop()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3:
        print("usage: python -m ngp_research.workspace.bridge {tcp-to-unix HOST:PORT PATH | unix-to-tcp PATH HOST:PORT}",
              file=sys.stderr)
        return 2
    try:
        relay = relay_from_args(*argv)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    asyncio.run(_serve([relay]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
