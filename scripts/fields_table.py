"""Print the docs/fields.md section "Every TrainingArguments field: honoured or refused" from raytrainer/fields.py.

    python scripts/fields_table.py

Paste the output into docs/fields.md in place of that section; tests/test_fields.py fails while the two differ.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from raytrainer.fields import HONOURED, REFUSED, REFUSED_ACCELERATOR_OPTIONS  # noqa: E402

HEADING = "## Every TrainingArguments field: honoured or refused"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    groups: dict[str, list[str]] = {}  # description -> fields, in the order of raytrainer/fields.py
    for name, how in HONOURED.items():
        groups.setdefault(how, []).append(name)
    options = ", ".join(f"`{o}`" for o in REFUSED_ACCELERATOR_OPTIONS)
    lines = [
        HEADING,
        "",
        f"Each of the {len(HONOURED) + len(REFUSED)} fields of `raytrainer.TrainingArguments` is honoured or "
        "refused, never silently ignored (`raytrainer/fields.py`; this table is printed by "
        "`python scripts/fields_table.py`, and a test keeps the two equal).",
        "",
        f"**Honoured ({len(HONOURED)})**",
        "",
        "| fields | how |",
        "|---|---|",
    ]
    lines += [f"| {', '.join(f'`{n}`' for n in names)} | {_cell(how)} |" for how, names in groups.items()]
    lines += [
        "",
        f"**Refused ({len(REFUSED)})**: `TrainingArguments(...)` accepts them (a config shared with evaluation "
        "scripts keeps working: `evaluate()` and `predict()` are transformers' own); `train()` "
        "(`args.check_supported()`) raises a ValueError naming the field and the fix when one is set away "
        f"from its default. `accelerator_config` is refused only for a non-default {options}.",
        "",
        "| field | fix |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_cell(fix)} |" for name, fix in REFUSED.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
