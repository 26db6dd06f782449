"""Netstrings (http://cr.yp.to/proto/netstrings.txt): a pure codec, no I/O.

A netstring is ``<len>:<payload>,`` where ``<len>`` is the payload length in ASCII decimal without leading
zeros (``0:,`` is the empty netstring). Postfix's socketmap client sends each request as one netstring and
expects each reply as one netstring (socketmap_table(5)).

Decoder is incremental: feed() it whatever bytes arrived, get back the payloads that are now complete.
Everything a peer controls is bounded *before* it is buffered: the length prefix may have at most as many
digits as ``max_size`` has, and a declared length above ``max_size`` is refused as soon as its colon is seen,
so a peer can never make us hold more than ``max_size`` + a few bytes. Any violation raises NetstringError
and poisons the decoder (the stream has lost framing; the only safe thing is to close the connection).
"""

from __future__ import annotations

DEFAULT_MAX_SIZE = 100_000  # Postfix refuses socketmap replies longer than this; requests are far smaller


class NetstringError(ValueError):
    """The byte stream is not a sequence of well-formed netstrings (or breaks a limit).

    ``payloads`` holds the complete payloads that preceded the error in the data of the failing feed() call:
    a server may still answer them before it closes the connection.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.payloads: list[bytes] = []


class NetstringTooLong(NetstringError):
    """The declared length exceeds the decoder's max_size."""


def encode(payload: bytes) -> bytes:
    """One payload as one netstring."""
    return b"%d:%b," % (len(payload), payload)


class Decoder:
    """Incremental netstring decoder.

    feed(data) returns the list of complete payloads (possibly empty) and keeps any partial netstring for the
    next call. On broken framing it raises NetstringError carrying the payloads completed before the break;
    after that every feed() raises again (with no payloads).
    """

    __slots__ = ("_buf", "_error", "_max_digits", "_need", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_size = max_size
        self._max_digits = len(str(max_size))
        self._buf = bytearray()
        self._need = -1  # payload length being read, -1 while reading the length prefix
        self._error: NetstringError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a complete netstring yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        if self._error is not None:
            raise type(self._error)(str(self._error))
        out: list[bytes] = []
        try:
            self._feed(data, out)
        except NetstringError as e:
            self._error = e
            self._buf.clear()
            e.payloads = out
            raise
        return out

    def _feed(self, data: bytes, out: list[bytes]) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while True:
            if self._need < 0:
                colon = buf.find(b":", pos, pos + self._max_digits + 1)
                if colon < 0:
                    prefix = bytes(buf[pos : min(n, pos + self._max_digits + 1)])
                    self._check_digits(prefix, complete=False)
                    if n - pos > self._max_digits:
                        raise NetstringTooLong(f"length prefix longer than {self._max_digits} digits")
                    break
                prefix = bytes(buf[pos:colon])
                self._check_digits(prefix, complete=True)
                length = int(prefix)
                if length > self.max_size:
                    raise NetstringTooLong(f"declared length {length} exceeds the limit of {self.max_size}")
                self._need = length
                pos = colon + 1
            end = pos + self._need
            if n <= end:  # payload or its trailing comma not here yet
                break
            if buf[end] != 0x2C:  # ","
                got = bytes(buf[end : end + 1])
                raise NetstringError(f"expected ',' after {self._need} bytes, got {got!r}")
            out.append(bytes(buf[pos:end]))
            pos = end + 1
            self._need = -1
        if pos:
            del buf[:pos]

    @staticmethod
    def _check_digits(prefix: bytes, *, complete: bool) -> None:
        if not prefix:
            if complete:
                raise NetstringError("empty length prefix")
            return
        if not prefix.isdigit():
            raise NetstringError(f"length prefix is not decimal: {prefix[:12]!r}")
        if len(prefix) > 1 and prefix[0] == 0x30:
            raise NetstringError("length prefix has a leading zero")
