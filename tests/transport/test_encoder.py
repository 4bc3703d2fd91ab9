"""The raw formats both ways: encoder_for (the server) and AudioDecoder (what a client hears,
`csm-stream say`), checked against decoders that are not csm-stream's own."""

import warnings

import numpy as np
import pytest

from csmstream.kernels.resample import Resampler
from csmstream.transport.encoder import AudioDecoder, encoder_for
from csmstream.transport.protocol import FORMATS
from tests import ffmpeg

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    audioop = pytest.importorskip("audioop")  # the standard library through Python 3.12

PCM = (np.random.default_rng(5).normal(size=24000) * 4000).astype(np.int16)


def encoded(fmt):
    enc = encoder_for(fmt, 20)
    out = b"".join(b for i in range(0, len(PCM), 2000) for b in enc.feed(PCM[i : i + 2000]))
    return out + b"".join(enc.finish())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_client_hears_the_formats_audio_however_the_bytes_are_cut(fmt):
    data = encoded(fmt)
    dec = AudioDecoder(fmt)
    cuts = np.sort(np.random.default_rng(1).choice(np.arange(1, len(data)), 25, replace=False))
    heard = np.concatenate([dec.decode(p) for p in np.split(np.frombuffer(data, np.uint8), cuts)])
    rate, enc = FORMATS[fmt]
    assert dec.rate == rate
    if enc == "pcm":
        if rate == 24000:
            want = PCM
        else:
            r = Resampler(24000, rate)
            want = np.concatenate([r.process(PCM), r.flush()])
    elif enc == "ulaw":
        want = np.frombuffer(audioop.ulaw2lin(data, 2), "<i2")
    elif enc == "alaw":
        want = np.frombuffer(audioop.alaw2lin(data, 2), "<i2")
    else:
        want = ffmpeg.g722_decode(data)
    np.testing.assert_array_equal(heard, want)


def test_only_raw_formats_are_decoded_here():
    with pytest.raises(ValueError, match="a raw format is decoded here .*g722_16000.*got 'mp3_44100_128'"):
        AudioDecoder("mp3_44100_128")


@pytest.mark.parametrize("fmt", ["pcm_16000", "ulaw_8000", "g722_16000", "mp3_24000_48", "opus_48000_32",
                                 "aac_24000_64", "flac_24000"])
def test_close_frees_the_codec_and_keeps_what_was_counted(fmt):
    """Job.release() closes its encoder when the request ends: what it counted stays (the done
    message and the metrics read audio_ms after), and closing twice is harmless."""
    enc = encoder_for(fmt, 100)
    out = b"".join(enc.feed(PCM)) + b"".join(enc.finish())
    counted = enc.audio_ms
    assert len(out) > 0 and counted > 900
    enc.close()
    enc.close()
    assert enc.audio_ms == counted
    assert getattr(enc, "_ctx", None) is None and getattr(enc, "_lame", None) is None
