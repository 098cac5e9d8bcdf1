"""scripts/long_docs.py: each episode's generator facts as one valid document record."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from long_docs import long_docs  # noqa: E402

from c2w.streams.validate import load_stream, write_stream  # noqa: E402


def test_one_document_per_episode_with_every_facts_probes(tmp_path):
    s = long_docs(seed=5, episodes=2, facts=6)
    back = load_stream(write_stream(s, tmp_path / "d.jsonl"))
    assert [r.episode for r in back.records] == [0, 1] and all(r.role == "learn" for r in back.records)
    for r in back.records:
        assert len(r.probes) == 2 * 6 and r.text.count(". ") == 5  # six sentences, two probes per fact
        assert all(p.answer in r.text for p in r.probes)
