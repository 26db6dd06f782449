"""autoport-checkpassword: the checkpassword program in Dovecot's passdb chain. It asks the sidecar and execs.

    autoport-checkpassword --socket /run/autoport/auth.sock [--timeout SECONDS] REPLY-PROGRAM [ARGS...]

More (the reasons and limits behind this module): docs/modules.md, sidecar/edge/checkpassword.py.
"""

import sys

if __name__ == "__main__" and "sidecar" not in sys.modules:  # run as a file under -I -S: find our package
    # this file is sidecar/edge/checkpassword.py: the directory that holds `sidecar` is two levels up
    _edge_dir = __file__.rpartition("/")[0] or "."
    sys.path.insert(0, _edge_dir + "/../..")

import _socket  # the C module: `import socket` costs far more
import posix  # builtin; `import os` would cost more and wraps the same calls
import time  # builtin, loaded at start-up

from sidecar.wire import authproto

EXIT_FAIL = 1
EXIT_MISUSE = 2
EXIT_TEMP = 111
DEFAULT_TIMEOUT = 30.0
MAX_FD3 = authproto.MAX_USER + authproto.MAX_PASSWORD + 64 + 3  # user, password, timestamp, 3 NULs

USAGE = "usage: autoport-checkpassword --socket PATH [--timeout SECONDS] REPLY-PROGRAM [ARGS...]"


class _Exit(Exception):
    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.why = why


def parse_args(argv: "list[str]") -> "tuple[str, float, list[str]]":
    """(socket path, timeout, reply program argv) from our argv[1:]."""
    path = ""
    timeout = DEFAULT_TIMEOUT
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            break
        name, eq, value = arg.partition("=")
        if name not in ("--socket", "--timeout"):
            raise _Exit(EXIT_MISUSE, f"unknown option {name}; {USAGE}")
        if not eq:
            i += 1
            if i >= len(argv):
                raise _Exit(EXIT_MISUSE, f"{name} needs a value; {USAGE}")
            value = argv[i]
        if name == "--socket":
            path = value
        else:
            try:
                timeout = float(value)
            except ValueError:
                raise _Exit(EXIT_MISUSE, f"bad --timeout; {USAGE}") from None
            if not 0 < timeout <= 3600:
                raise _Exit(EXIT_MISUSE, f"bad --timeout; {USAGE}")
        i += 1
    if not path:
        raise _Exit(EXIT_MISUSE, f"--socket is required; {USAGE}")
    program = argv[i:]
    if not program:
        raise _Exit(EXIT_MISUSE, f"no reply program; {USAGE}")
    return path, timeout, program


def read_fd3(fd: int = 3) -> "tuple[bytes, bytes]":
    """(user, password) from the checkpassword descriptor, at most MAX_FD3 bytes read."""
    data = b""
    try:
        while len(data) <= MAX_FD3:
            chunk = posix.read(fd, MAX_FD3 + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        raise _Exit(EXIT_MISUSE, "cannot read fd 3 (not started by Dovecot's checkpassword?)") from None
    finally:
        try:  # noqa: SIM105  (contextlib would cost an import)
            posix.close(fd)
        except OSError:
            pass
    if len(data) > MAX_FD3:
        raise _Exit(EXIT_FAIL)  # longer than any user/password we accept: cannot be valid
    parts = data.split(b"\0")
    if len(parts) != 4 or parts[-1] != b"":
        raise _Exit(EXIT_MISUSE, "malformed fd 3 data (expected user NUL password NUL timestamp NUL)")
    return parts[0], parts[1]


def _env(name: bytes) -> str:
    return posix.environ.get(name, b"").decode("utf-8", "surrogateescape")


def ask(path: str, request: bytes, timeout: float) -> authproto.Reply:
    """Send one request to the sidecar and read its reply; _Exit(111) on any trouble."""
    deadline = time.monotonic() + timeout
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        reader = authproto.NetstringReader(authproto.MAX_REPLY)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Exit(EXIT_TEMP, "timed out waiting for the sidecar")
            sock.settimeout(left)
            chunk = sock.recv(4096)
            if not chunk:
                raise reader.truncated()
            payload = reader.feed(chunk)
            if payload is not None:
                return authproto.parse_reply(payload)
    except TimeoutError:
        raise _Exit(EXIT_TEMP, "timed out waiting for the sidecar") from None
    except OSError as e:
        raise _Exit(EXIT_TEMP, f"sidecar at {path} unreachable: {e.strerror or e}") from None
    except authproto.ProtocolError as e:
        raise _Exit(EXIT_TEMP, f"malformed reply from the sidecar: {e}") from None
    finally:
        sock.close()


def exec_reply(program: "list[str]", fields: "dict[str, str]") -> None:
    """Set the reply fields in the environment, list them in EXTRA, exec the reply program."""
    env = dict(posix.environ)
    names = []
    for key, value in fields.items():
        name = key.upper()
        env[name.encode("ascii")] = value.encode("utf-8", "surrogateescape")
        names.append(name)
    env[b"EXTRA"] = " ".join(names).encode("ascii")
    try:
        posix.execve(program[0], program, env)
    except OSError as e:
        raise _Exit(EXIT_MISUSE, f"cannot execute {program[0]}: {e.strerror or e}") from None


def run(argv: "list[str]") -> int:
    path, timeout, program = parse_args(argv)
    user, password = read_fd3()
    request = authproto.Request(
        user.decode("utf-8", "surrogateescape"),
        password.decode("utf-8", "surrogateescape"),
        _env(b"SERVICE"),
        _env(b"TCPREMOTEIP"),
        _env(b"TCPLOCALIP"),
    )
    try:
        wire = authproto.encode_request(request)
    except authproto.ProtocolError:
        return EXIT_FAIL  # empty user, control characters, oversized: cannot be valid credentials
    reply = ask(path, wire, timeout)
    if reply.status == authproto.FAIL:
        return EXIT_FAIL
    if reply.status == authproto.TEMP:
        return EXIT_TEMP
    exec_reply(program, reply.fields)
    return EXIT_MISUSE  # pragma: no cover - execve does not return


def main() -> int:
    try:
        return run(sys.argv[1:])
    except _Exit as e:
        if e.why:
            sys.stderr.write(f"autoport-checkpassword: {e.why}\n")
        return e.code


if __name__ == "__main__":
    sys.exit(main())
