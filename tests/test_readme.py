"""The README's Python examples run as written (in order, in one namespace, as a reader would paste them)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 5  # the tour: merges, assignment, SE-Merging, the op, MuDSC, build info


def test_readme_python_examples_run():
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # name the block, so a stale example is found at once
            pytest.fail(f"README python block {i} ({block.splitlines()[0]!r}) raised {type(exc).__name__}: {exc}")
    # the examples' own claims, checked where they state a result
    assert namespace["mk"].check_assignment(namespace["cost"], namespace["rows"], namespace["cols"], namespace["u"],
                                            namespace["v"])
    assert namespace["alpha"].shape == (32, 4)  # SE-Merging: per-sample coefficients of the 4 experts
    assert namespace["y"].shape == (16, 197, 3072)  # per_sample_linear: (B, T, out)
