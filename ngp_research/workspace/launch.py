"""Start relays inside the sandbox, then run the server behind them.

    python -m ngp_research.workspace.launch [--tcp-to-unix HOST:PORT=PATH]... [--unix-to-tcp PATH=HOST:PORT]... -- CMD...

The relays (see :mod:`.bridge`) are listening before ``CMD`` starts; ``CMD`` runs as a child. SIGTERM,
SIGINT and SIGHUP are passed on to it; when it ends the relays stop and the launcher exits with its
status. A relay that cannot start is fatal (exit 1) and ``CMD`` is never started.
"""

import argparse
import asyncio
import signal
import sys

from .bridge import TcpToUnix, UnixToTcp, parse_address


def _relays(args) -> list:
    relays = []
    for spec in args.tcp_to_unix:
        addr, _, path = spec.partition("=")
        relays.append(TcpToUnix(path, *parse_address(addr)))
    for spec in args.unix_to_tcp:
        path, _, addr = spec.partition("=")
        relays.append(UnixToTcp(path, *parse_address(addr)))
    return relays


async def run(relays, command) -> int:
    for r in relays:
        await r.start()
    try:
        proc = await asyncio.create_subprocess_exec(*command)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda s=sig: proc.returncode is None and proc.send_signal(s))
        return await proc.wait()
    finally:
        for r in relays:
            await r.stop()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: python -m ngp_research.workspace.launch [--tcp-to-unix HOST:PORT=PATH]... "
              "[--unix-to-tcp PATH=HOST:PORT]... -- CMD...", file=sys.stderr)
        return 2
    i = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m ngp_research.workspace.launch")
    parser.add_argument("--tcp-to-unix", action="append", default=[], metavar="HOST:PORT=PATH")
    parser.add_argument("--unix-to-tcp", action="append", default=[], metavar="PATH=HOST:PORT")
    args = parser.parse_args(argv[:i])
    try:
        relays = _relays(args)
    except ValueError as e:
        parser.error(str(e))
    try:
        code = asyncio.run(run(relays, argv[i + 1:]))
    except OSError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 1
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
