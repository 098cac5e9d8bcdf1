import pytest

from c2w.streams.general_text import general_text


def test_general_text():
    t = general_text(16, 400, seed=0)
    assert len(t) == 16 and len(set(t)) == 16
    assert t == general_text(16, 400, seed=0) and t != general_text(16, 400, seed=1)
    for p in t:
        assert 400 <= len(p) <= 800
        assert p[-1] in ".!?" and p[0].isupper()
        assert "  " not in p and "\n" not in p
        assert "::=" not in p and "***" not in p


def test_general_text_sizes():
    assert all(200 <= len(p) <= 400 for p in general_text(8, 200))
    assert general_text(0) == []
    with pytest.raises(ValueError):
        general_text(10_000)
    with pytest.raises(ValueError):
        general_text(2, min_chars=0)
