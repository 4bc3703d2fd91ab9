"""Ogg Opus output (RFC 7845): OpenAI's `opus` and ElevenLabs' `opus_48000_KBPS`, streamed.

libopus (FFmpeg's, through PyAV) codes the 24 kHz PCM as it is (Opus takes 24 kHz input; decoders
play it at 48 kHz) in 20 ms packets at a constant bit rate. The packets go out in Ogg pages: the
first chunk opens the stream (the OpusHead and OpusTags pages) and carries the first packets, so
time to first audio stays that of raw PCM; after that one page per `chunk_ms` of packets; the
last page is marked end-of-stream and its granule position trims the codec's padding, so a
decoder gives back exactly as many samples as went in. Each page's granule position is counted
at 48 kHz and includes the 312 samples of pre-skip, the encoder's look-ahead, which decoders drop:
the decoded audio lines up with the input with no delay (delay_ms stays 0).

Chunks carry the milliseconds of audio they decode to (packets.py): Ogg page bytes are not
proportional to time.
"""

from __future__ import annotations

import os
import struct
from typing import ClassVar

from ..kernels.crc import ogg_crc32
from .packets import PacketEncoder

SOURCE_RATE = 24_000
FRAME = 480  # 20 ms at 24 kHz: one Opus packet
GRANULE_RATE = 48_000  # Ogg Opus counts samples at 48 kHz, whatever the input rate
BOS, EOS = 0x02, 0x04
VENDOR = b"csm-stream"
COMPLEXITY = 5


def opus_tags() -> bytes:
    """The comment header: vendor string, no comments."""
    return b"OpusTags" + struct.pack("<I", len(VENDOR)) + VENDOR + struct.pack("<I", 0)


def ogg_page(packets: list[bytes], granule: int, serial: int, seq: int, flags: int = 0) -> bytes:
    """One Ogg page holding whole packets (at most 255 lacing values: the caller keeps to that)."""
    lacing = bytearray()
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes([len(p) % 255])
    if len(lacing) > 255:
        raise ValueError(f"{len(packets)} packets need {len(lacing)} lacing values; an Ogg page holds 255")
    head = struct.pack("<4sBBqIII", b"OggS", 0, flags, granule, serial, seq, 0) + bytes([len(lacing)]) + lacing
    page = head + b"".join(packets)
    return page[:22] + struct.pack("<I", ogg_crc32(page)) + page[26:]


class OpusEncoder(PacketEncoder):
    """PacketEncoder for an opus_48000_KBPS format: 20 ms Opus packets in Ogg pages."""

    codec = "libopus"
    # complexity 5 of 10: a third of the CPU of 10 at 32 kbps (2.8 against 9.2 ms a second of audio
    # on the CI machine); a server codes hundreds of streams
    options: ClassVar[dict[str, str]] = {"application": "audio", "frame_duration": "20", "vbr": "off",
                                         "compression_level": str(COMPLEXITY)}

    def __init__(self, fmt: str, chunk_ms: int) -> None:
        super().__init__(fmt, chunk_ms)
        self.head = bytes(self._ctx.extradata)  # OpusHead, as libopus describes the stream
        self.pre_skip = int.from_bytes(self.head[10:12], "little")
        self._serial = int.from_bytes(os.urandom(4), "little")
        self._seq = 0  # Ogg page sequence number
        self._granule = 0  # of the last page sent

    def _wrap(self, packets, first, eos):
        out = bytearray()
        if first:
            out += self._page([self.head], 0, BOS) + self._page([opus_tags()], 0)
        self._start = self._granule
        packets = [p for p, _ in packets]
        while packets or eos:  # 100 packets a page: 2 lacing values each up to 204 kbps (192 is the most)
            part, packets = packets[:100], packets[100:]
            last = eos and not packets
            self._granule += len(part) * FRAME * GRANULE_RATE // SOURCE_RATE
            if last:  # trims the padding of the short last frame and the look-ahead's tail
                self._granule = self.pre_skip + self._fed * GRANULE_RATE // SOURCE_RATE
            out += self._page(part, self._granule, EOS if last else 0)
            if last:
                break
        return bytes(out)

    def _ms(self, packets, eos):
        heard = max(self._granule, self.pre_skip) - max(self._start, self.pre_skip)  # pre-skip is not heard
        return 1000.0 * heard / GRANULE_RATE

    def _page(self, packets: list[bytes], granule: int, flags: int = 0) -> bytes:
        page = ogg_page(packets, granule, self._serial, self._seq, flags)
        self._seq += 1
        return page
