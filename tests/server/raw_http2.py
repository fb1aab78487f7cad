"""A hostile gRPC client built from raw HTTP/2 frames: it sends one call and never reads its answer.

Data flow of `StalledCall(host, port, path, request_bytes)`:
  1. Open a TCP connection; send the HTTP/2 preface and SETTINGS with INITIAL_WINDOW_SIZE = 0, so the
     server may send headers but not one byte of DATA on any stream (a client that never reads).
  2. Send the call: HEADERS (HPACK literals, no Huffman, no indexing) and one DATA frame holding the
     gRPC-framed request, with END_STREAM.
  3. A daemon thread answers the server's SETTINGS and PING frames (so the connection stays healthy)
     and records every frame type it sees; no WINDOW_UPDATE is ever sent.
  4. `close()` drops the connection.
"""

from __future__ import annotations

import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
STREAM_ID = 1


def _frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([frame_type, flags]) + struct.pack(">I", stream_id) + payload


def _hpack_int(value: int) -> bytes:  # 7-bit prefix integer, H (Huffman) bit = 0
    if value < 127:
        return bytes([value])
    out, value = bytearray([127]), value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_literal(name: str, value: str) -> bytes:  # "literal header field without indexing, new name"
    name_bytes, value_bytes = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(name_bytes)) + name_bytes + _hpack_int(len(value_bytes)) + value_bytes


class StalledCall:
    def __init__(self, host: str, port: int, path: str, request: bytes):
        self.frames_seen: list[int] = []
        self._sock = socket.create_connection((host, port), timeout=10)
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        headers = b"".join(_hpack_literal(name, value) for name, value in (
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"{host}:{port}"),
            ("content-type", "application/grpc"), ("te", "trailers")))
        grpc_message = b"\x00" + struct.pack(">I", len(request)) + request
        self._send(PREFACE + _frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 0))
                   + _frame(HEADERS, END_HEADERS, STREAM_ID, headers)
                   + _frame(DATA, END_STREAM, STREAM_ID, grpc_message))
        self._reader = threading.Thread(target=self._answer_control_frames, daemon=True)
        self._reader.start()

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(data)

    def _read_exactly(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                raise ConnectionError("closed")
            chunks += chunk
        return bytes(chunks)

    def _answer_control_frames(self) -> None:
        try:
            while True:
                header = self._read_exactly(9)
                length = int.from_bytes(header[:3], "big")
                frame_type, flags = header[3], header[4]
                payload = self._read_exactly(length)
                self.frames_seen.append(frame_type)
                if frame_type == SETTINGS and not flags & ACK:
                    self._send(_frame(SETTINGS, ACK, 0))
                elif frame_type == PING and not flags & ACK:
                    self._send(_frame(PING, ACK, 0, payload))
        except OSError:  # closed by either side: nothing left to answer
            return

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)
