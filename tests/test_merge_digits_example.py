"""The README's demo command: examples/merge_digits.py trains, merges through the CLI and reports (~6 s)."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "merge_digits.py")
METHODS = ("task arithmetic", "TIES", "DARE")


def test_demo_runs_and_every_merge_beats_the_base(tmp_path):
    done = subprocess.run([sys.executable, EXAMPLE, "--workdir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = {}
    for line in done.stdout.splitlines():
        found = re.match(r"merged: (.+?): mean (\d\.\d+) \(([+-]\d\.\d+) vs the base", line)
        if found:
            summary[found.group(1)] = (float(found.group(2)), float(found.group(3)))
    assert [any(name.startswith(m) for name in summary) for m in METHODS] == [True] * len(METHODS), done.stdout
    # the demo's point, as the README states it for seed 0: each merge of the four experts beats the base
    for name, (mean, gain) in summary.items():
        assert 0.0 < mean <= 1.0 and gain > 0, (name, mean, gain)
    # the base, the four experts and one merged checkpoint per method (written by the CLI) are in the work dir
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.safetensors" for n in (
        "base", "original", "rotated", "inverted", "mirrored", "ta", "ties", "dare"))
