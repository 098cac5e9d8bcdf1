"""Streams: the records a learner observes, episode by episode, and the probes that grade it.

- `records`: the data types (Probe, Record, Observation, Stream).
- `validate`: the JSONL file format; `load_stream`, `write_stream`, `validate_lines`.
- `fictional`: the built-in generator of invented facts (`generate_fictional`).
- `controls`: real-world control probes and known facts (`control_candidates`, `add_controls`).
- `general_text`: held-out English passages for language-modelling drift.

Submodules are imported on demand; this package itself only re-exports the data types.
"""

from c2w.streams.records import ROLES, Observation, Probe, Record, Stream

__all__ = ["ROLES", "Observation", "Probe", "Record", "Stream"]
