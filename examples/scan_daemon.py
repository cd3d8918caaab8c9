"""A small file-scanning daemon that is handed open files instead of paths.

The daemon never opens a file itself.  A client opens the file (with its own
permissions), connects over a SOCK_SEQPACKET socket and passes the open
descriptor (SCM_RIGHTS); the daemon checks who the client is (SO_PEERCRED),
reads the file through the descriptor it was handed, and answers with the
file's size, line count and SHA-256.  So the daemon can run unprivileged and
still scan files only the client could open, even files with no name at all.

    python examples/scan_daemon.py serve /tmp/scan.sock [--allow-uid UID ...]
    python examples/scan_daemon.py scan /tmp/scan.sock FILE
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
from typing import Iterable, Optional

import afunix

MAX_REQUEST = 4096


def scan(fd: int) -> dict:
    """Size, line count and SHA-256 of the file open at `fd`, read from its start."""
    digest = hashlib.sha256()
    size = lines = 0
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 16, offset)
        if not chunk:
            break
        offset += len(chunk)
        size += len(chunk)
        lines += chunk.count(b"\n")
        digest.update(chunk)
    return {"size": size, "lines": lines, "sha256": digest.hexdigest()}


def handle(conn: socket.socket, allowed_uids: Iterable[int]) -> None:
    """Serve one client: check its credentials, take one descriptor, answer."""
    creds = afunix.peer_credentials(conn)
    # Take the request in any case: closing a socket with a request still
    # queued would reset the connection before the client reads our answer.
    try:
        data, fds, _, _ = afunix.recv_fds(conn, MAX_REQUEST, 1)
    except afunix.TruncatedError:  # more than one descriptor: refused, none leaked
        conn.send(json.dumps({"error": "send exactly one descriptor"}).encode())
        return
    if creds.uid not in allowed_uids:
        afunix.close_fds(fds)  # never look at what a stranger sent
        conn.send(json.dumps({"error": "uid %d is not allowed" % creds.uid}).encode())
        return
    if not fds:
        conn.send(json.dumps({"error": "no descriptor"}).encode())
        return
    try:
        reply = scan(fds[0])
    except OSError as exc:  # a directory, a socket, ...
        reply = {"error": "cannot read: %s" % exc.strerror}
    finally:
        afunix.close_fds(fds)
    reply["client_pid"] = creds.pid
    reply["request"] = data.decode(errors="replace")
    conn.send(json.dumps(reply).encode())


def serve(path: str, allowed_uids: Iterable[int]) -> None:
    """Accept clients one at a time until SIGTERM/SIGINT."""
    allowed = set(allowed_uids)
    # mode 0o600: only our own user may even connect; the uid check is a second fence
    with afunix.listen(path, socket.SOCK_SEQPACKET, mode=0o600) as server:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                try:
                    handle(conn, allowed)
                except OSError as exc:
                    print("client error: %s" % exc, file=sys.stderr, flush=True)


def request(path: str, filename: str, fd: Optional[int] = None) -> dict:
    """Ask the daemon at `path` to scan `filename` (or the already open `fd`)."""
    own = fd is None
    if fd is None:
        fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with afunix.connect(path, socket.SOCK_SEQPACKET, timeout=10) as conn:
            afunix.send_fds(conn, [filename.encode()], [fd])
            return json.loads(conn.recv(MAX_REQUEST))  # type: ignore[no-any-return]
    finally:
        if own:
            os.close(fd)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("socket")
    p_serve.add_argument("--allow-uid", type=int, action="append",
                         help="uids allowed to ask (default: our own)")
    p_scan = sub.add_parser("scan")
    p_scan.add_argument("socket")
    p_scan.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.socket, args.allow_uid or [os.getuid()])
        return 0
    reply = request(args.socket, args.file)
    print(json.dumps(reply, indent=2))
    return 1 if "error" in reply else 0


if __name__ == "__main__":
    sys.exit(main())
