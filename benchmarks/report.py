"""Write the README's "Accuracy" and "Performance" sections from the benchmark results.

    python benchmarks/report.py          # rewrite README.md between the markers
    python benchmarks/report.py --check  # exit 1 if README.md is out of date

Each section is the markdown a benchmark rendered from its JSON (``benchmarks/results/<name>.md``, written by
``benchmarks/<name>.py``; runs on another machine under ``benchmarks/results/<machine>/``) with its headings moved
under the README's section, placed between ``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` in README.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: README section -> (its markdown under benchmarks/results/, the level of its highest heading in the README)
SECTIONS = {
    "accuracy": ("accuracy.md", 3),
    "speed": ("speed.md", 3),
    "speed-xeon-amx": ("xeon-amx/speed.md", 4),  # the same benchmark on a second machine, under its own heading
    "allocator": ("allocator.md", 3),
}


def demote_headings(body: str, top: int = 3) -> str:
    """Shift ``body``'s markdown headings so that its highest one is at level ``top`` (under the README's ``##``)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#+) ", body, re.M)]
    if not levels:
        return body
    shift = top - min(levels)
    return re.sub(r"^(#+) ", lambda m: "#" * max(1, len(m.group(1)) + shift) + " ", body, flags=re.M)


def splice(readme: str, name: str, body: str) -> str:
    """Return ``readme`` with the text between ``name``'s markers replaced by ``body``."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README.md has no {start} ... {end} markers")
    return pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", readme)


def render(readme: str, results: Path = ROOT / "benchmarks" / "results") -> str:
    for name, (file, top) in SECTIONS.items():
        readme = splice(readme, name, demote_headings((results / file).read_text(), top))
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md is out of date: run `python benchmarks/report.py`", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
