"""A small RTSP server (RTP over the RTSP connection, H.264) for tests, benchmarks and
`test-image`: it plays an H.264 file it made itself, in real time and looping, to every
client that connects. It exists because nothing can be downloaded here and Debian's RTSP
servers pull in GStreamer; it serves 127.0.0.1 only unless told otherwise.

It speaks what FFmpeg (and so PyAV on the unit) needs: OPTIONS, DESCRIBE, SETUP with
`RTP/AVP/TCP;interleaved`, PLAY, GET_PARAMETER and TEARDOWN; H.264 per RFC 6184 (single NAL
units and FU-A fragments).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import random
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PAYLOAD = 96
MAX_RTP_PAYLOAD = 1400
CLOCK = 90000


def make_h264(path: Path, seconds: float = 4.0, fps: int = 15, width: int = 640,
              height: int = 480, picture: np.ndarray[Any, Any] | None = None) -> Path:
    """Encode a moving picture (or a test pattern) with libx264 into a raw H.264 file, with
    SPS/PPS repeated at every key frame so a client can join at any GOP."""
    import av
    from PIL import Image

    if picture is None:
        yy, xx = np.mgrid[0:height, 0:width]
        picture = np.stack([xx * 255 // width, yy * 255 // height,
                            np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    base = np.asarray(Image.fromarray(picture).resize((width, height)))
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(fps),
                          "x264-params": "repeat-headers=1"}
        for index in range(int(seconds * fps)):
            shifted = np.roll(base, index * 4, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(shifted, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
    return path


def split_nals(data: bytes) -> list[bytes]:
    """Annex-B access unit -> NAL units without start codes."""
    parts = data.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01").split(b"\x00\x00\x01")
    return [p for p in parts if p]


def read_access_units(path: Path) -> list[list[bytes]]:
    import av

    with av.open(str(path)) as container:
        return [split_nals(bytes(p)) for p in container.demux(video=0) if p.size]


def rtp_packets(nals: list[bytes], seq: itertools.count[int], timestamp: int, ssrc: int
                ) -> list[bytes]:
    packets: list[bytes] = []
    for n, nal in enumerate(nals):
        last_nal = n == len(nals) - 1
        if len(nal) <= MAX_RTP_PAYLOAD:
            chunks = [nal]
        else:  # FU-A: indicator (F/NRI of the NAL, type 28) + header (S/E, type)
            indicator = (nal[0] & 0xE0) | 28
            body = nal[1:]
            pieces = [body[i:i + MAX_RTP_PAYLOAD] for i in range(0, len(body), MAX_RTP_PAYLOAD)]
            chunks = []
            for i, piece in enumerate(pieces):
                fu_header = (nal[0] & 0x1F) | (0x80 if i == 0 else 0) | \
                    (0x40 if i == len(pieces) - 1 else 0)
                chunks.append(bytes([indicator, fu_header]) + piece)
        for i, chunk in enumerate(chunks):
            marker = 0x80 if last_nal and i == len(chunks) - 1 else 0
            header = struct.pack("!BBHII", 0x80, marker | PAYLOAD, next(seq) & 0xFFFF,
                                 timestamp & 0xFFFFFFFF, ssrc)
            packets.append(header + chunk)
    return packets


class RtspServer:
    """Serves `path` (raw H.264) at rtsp://HOST:PORT/stream; start() and stop()."""

    def __init__(self, path: Path, fps: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.units = read_access_units(path)
        if not self.units:
            raise ValueError(f"{path}: no H.264 access units")
        self.fps = fps
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(8)
        self.host, self.port = self._sock.getsockname()
        self._stop = threading.Event()
        self._clients: list[socket.socket] = []
        self.sessions = 0

    def url(self, host: str | None = None) -> str:
        return f"rtsp://{host or self.host}:{self.port}/stream"

    def start(self) -> RtspServer:
        threading.Thread(target=self._accept, name="rtsp-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):  # wakes the accept() call, freeing the port
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for client in list(self._clients):
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._clients.append(conn)
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _sdp(self) -> str:
        first = self.units[0]
        params = [n for n in first if n and n[0] & 0x1F in (7, 8)]
        sprop = ",".join(base64.b64encode(n).decode() for n in params)
        fmtp = "packetization-mode=1" + (f";sprop-parameter-sets={sprop}" if sprop else "")
        return ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=edgebake test stream\r\nt=0 0\r\n"
                f"m=video 0 RTP/AVP {PAYLOAD}\r\nc=IN IP4 0.0.0.0\r\n"
                f"a=rtpmap:{PAYLOAD} H264/{CLOCK}\r\na=fmtp:{PAYLOAD} {fmtp}\r\n"
                "a=control:track1\r\n")

    def _session(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        playing = threading.Event()
        reader = conn.makefile("rb")

        def reply(cseq: str, extra: str = "", body: str = "", status: str = "200 OK") -> None:
            head = f"RTSP/1.0 {status}\r\nCSeq: {cseq}\r\n{extra}"
            if body:
                head += f"Content-Length: {len(body.encode())}\r\n"
            with lock:
                conn.sendall((head + "\r\n" + body).encode())

        try:
            while not self._stop.is_set():
                first = reader.read(1)
                if not first:
                    return
                if first == b"$":  # RTCP from the client: skip it
                    size = struct.unpack("!xH", reader.read(3))[1]
                    reader.read(size)
                    continue
                lines, headers = _read_request(first, reader)
                method = lines[0].split(" ")[0]
                cseq = headers.get("cseq", "0")
                if method == "OPTIONS":
                    reply(cseq, "Public: OPTIONS, DESCRIBE, SETUP, PLAY, GET_PARAMETER, "
                                "TEARDOWN\r\n")
                elif method == "DESCRIBE":
                    base = lines[0].split(" ")[1].rstrip("/") + "/"
                    reply(cseq, f"Content-Base: {base}\r\nContent-Type: application/sdp\r\n",
                          self._sdp())
                elif method == "SETUP":
                    if "interleaved" not in headers.get("transport", ""):
                        reply(cseq, status="461 Unsupported Transport")
                        continue
                    reply(cseq, "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n"
                                "Session: 4e2a1b7c;timeout=60\r\n")
                elif method == "PLAY":
                    reply(cseq, "Session: 4e2a1b7c\r\nRange: npt=0.000-\r\n")
                    if not playing.is_set():
                        playing.set()
                        self.sessions += 1
                        threading.Thread(target=self._play, args=(conn, lock), daemon=True
                                         ).start()
                elif method == "TEARDOWN":
                    reply(cseq, "Session: 4e2a1b7c\r\n")
                    return
                else:  # GET_PARAMETER keep-alives and the rest
                    reply(cseq, "Session: 4e2a1b7c\r\n")
        except OSError:
            return
        finally:
            conn.close()
            if conn in self._clients:
                self._clients.remove(conn)

    def _play(self, conn: socket.socket, lock: threading.Lock) -> None:
        seq = itertools.count(random.randrange(1 << 16))
        ssrc = random.randrange(1 << 32)
        period = 1.0 / self.fps
        started = time.monotonic()
        for frame_index in itertools.count():
            if self._stop.is_set():
                return
            nals = self.units[frame_index % len(self.units)]
            timestamp = frame_index * CLOCK // self.fps
            data = b"".join(b"$\x00" + struct.pack("!H", len(p)) + p
                            for p in rtp_packets(nals, seq, timestamp, ssrc))
            try:
                with lock:
                    conn.sendall(data)
            except OSError:
                return
            delay = started + (frame_index + 1) * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def _read_request(first: bytes, reader: Any) -> tuple[list[str], dict[str, str]]:
    """An RTSP request's lines and headers (its body, if any, read and dropped)."""
    lines = [(first + reader.readline()).decode(errors="replace").strip()]
    while lines[-1]:
        lines.append(reader.readline().decode(errors="replace").strip())
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    if int(headers.get("content-length", "0")):
        reader.read(int(headers["content-length"]))
    return lines, headers
