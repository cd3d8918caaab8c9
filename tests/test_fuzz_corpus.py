"""The channel fuzz target's committed seeds, replayed on both backends (tests/fuzz_channel.py).

CI also runs the target itself under atheris for a bounded time
(.ci/fuzz-channel); here the seeds keep every scenario they hold in the
ordinary suite, and the independent parse is checked against cases whose
outcome is written down by hand.
"""
from __future__ import annotations

import os

import pytest

import afunix._backend
import afunix._chanio
from fuzz_channel import SEEDS, decode, expected, one_input, run

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz_corpus", "channel")
FILES = sorted(os.listdir(CORPUS))


def test_committed_corpus_is_the_seeds_the_target_writes() -> None:
    assert FILES == sorted(SEEDS)
    for name in FILES:
        with open(os.path.join(CORPUS, name), "rb") as f:
            assert f.read() == SEEDS[name], name


@pytest.mark.parametrize("name", FILES)
def test_seed_replays_clean(name: str) -> None:
    with open(os.path.join(CORPUS, name), "rb") as f:
        one_input(f.read())


# What the seeds must come to, written by hand from docs/PROTOCOL.md: the
# independent parse is itself checked, so a wrong oracle cannot hide a bug.
OUTCOMES = {
    "stream-frames-and-descriptors": ([b"hello", b"two fds", b""], "eof"),
    "seqpacket-interleaved-batch": ([b"abc", b"split"], "eof"),
    "seqpacket-empty-record-between-frames": ([b"one"], "error"),
    "seqpacket-empty-record-live-peer": ([b"one"], "error"),
    "seqpacket-long-records": ([], "error"),
    "stream-bad-header": ([b"ok"], "error"),
    "stream-descriptors-on-a-later-byte": ([], "error"),
    "stream-close-mid-frame": ([], "error"),
    "stream-live-partial-header": ([b"x"], "blocked"),
    "stream-over-max-frame": ([b"s" * 16], "error"),
    "seqpacket-count-mismatch": ([], "error"),
    "stream-stray-descriptors": ([b"plain"], "error"),
    "stream-glued-reads": ([b"a" * 200, b"b" * 100, b"c" * 50, b"d"], "eof"),
}


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_independent_parse_gives_the_outcome_written_by_hand(name: str) -> None:
    script = decode(SEEDS[name])
    got, end, written = run(script)
    want, want_end = expected(script, written)
    assert ([m for _, m, _ in want], want_end) == OUTCOMES[name]
    assert ([m for _, m, _ in got], end) == OUTCOMES[name]


def test_descriptors_arrive_with_their_message() -> None:
    script = decode(SEEDS["stream-glued-reads"])
    got, _, _ = run(script)
    assert [fds for _, _, fds in got] == [(), (0,), (), (3, 0, 1)]


def test_the_target_catches_a_channel_that_takes_an_empty_record_for_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A planted mutant: the channel without its empty-record check (the
    # defect before it) must make the target fail on the seed that holds one.
    monkeypatch.setattr(afunix._chanio, "empty_record_sent", lambda fd: False)
    # (and its other half: a record read after an empty one by the same call)
    monkeypatch.setattr(type(afunix._backend.impl.new_chan_rx()), "empty_record", 0)
    with pytest.raises(AssertionError, match="a reading of the protocol"):
        one_input(SEEDS["seqpacket-empty-record-between-frames"])
