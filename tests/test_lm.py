"""Offline text and tokens for the language-model path (``signal_drift.lm``)."""

from signal_drift.lm import ByteTokenizer, offline_text


def test_offline_domains_are_real_text():
    a, b = offline_text("pydoc"), offline_text("docstrings")
    assert len(a) > 100_000 and len(b) > 100_000 and a[:200] != b[:200]
    assert ByteTokenizer().decode(ByteTokenizer().encode(b[:500])) == b[:500]
