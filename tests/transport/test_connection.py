"""Connection's pieces that need no socket."""

from csmstream.transport.connection import PlaybackClock


def test_playback_clock_counts_a_gap_only_when_the_audio_before_has_run_out():
    c = PlaybackClock()
    assert not c.advance(10.0, 100)  # playback starts: 10.0 .. 10.1 s
    assert not c.advance(10.05, 100)  # early: queued behind the first, plays until 10.2
    assert not c.advance(10.2, 100)  # exactly on time: no gap
    assert c.advance(10.35, 100)  # 10.3 had passed: the client heard silence
    assert not c.advance(10.4, 100)  # counted from the restart at 10.35, plays until 10.45
    c.reset()  # idle between requests: the next chunk starts a new playback, not a gap
    assert not c.advance(20.0, 100)
