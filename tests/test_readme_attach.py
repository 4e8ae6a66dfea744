"""The README's "Attach to your training step" code block runs (and its asserts hold)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _attach_block() -> str:
    text = README.read_text()
    section = text.split("## Attach to your training step", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the section has no python code block"
    return match.group(1)


def test_readme_attach_section_runs():
    code = _attach_block()
    assert len(code.strip().splitlines()) <= 15
    assert "assert" in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme_attach"})
