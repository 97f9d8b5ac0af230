"""The README stays true to the code: its configuration table is the generated one and its
module table names every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

from roomcast.config import markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
PACKAGE = ROOT / "node" / "roomcast"


def test_readme_configuration_table_is_the_generated_one() -> None:
    """`python -m roomcast.config` prints the table; README.md carries it verbatim."""
    assert markdown_table() in README


def test_readme_module_table_lists_every_module() -> None:
    """Every .py file under node/roomcast/ has a row in the README's module table."""
    rows = set(re.findall(r"^\| `([^`]+)` \|", README, flags=re.MULTILINE))
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    missing = sorted(m for m in modules if m not in rows)
    assert missing == [], f"README module table misses {missing}"
