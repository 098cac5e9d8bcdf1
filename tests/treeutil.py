"""Snapshot of a folder, for tests that check a failed or refused command left it untouched."""

import os


def tree(d) -> dict:
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out
