"""Write the tested-cases tables of docs/robustness.md from the tests' own expectations.

The tables between the ``<!-- cases:begin -->`` and ``<!-- cases:end -->`` markers are generated
from the case lists in ``tests/test_cli_errors.py`` and ``tests/test_hostile_inputs.py``, so
the document cannot claim a case the tests do not check.
``tests/test_cli_errors.py::test_robustness_doc_lists_the_tested_cases`` fails when the
document is out of date; regenerate with::

    .venv/bin/python scripts/robustness_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "robustness.md"
BEGIN, END = "<!-- cases:begin -->", "<!-- cases:end -->"


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 56:
        text = text[:53] + "..."
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _describe(exc: BaseException) -> str:
    detail = f"({exc})" if str(exc) else ""
    return f"{type(exc).__name__}{detail}"


def tables() -> str:
    """The generated Markdown (tables of every case the tests check)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_cli_errors as t

    lines = ["### A model named inside a circuit file (`netcarve diagram FILE`)", "",
             "| label in the file | exit | message contains |", "|---|---|---|"]
    lines += [f"| {_cell(label)} | {code} | {_cell(text)} |" for label, code, text in
              t.LABEL_CASES]
    lines += ["", "No case imports the module or calls the function (a test-suite module that "
              "records its import proves it); the same spec typed as `--model` is honoured.",
              "", "### Malformed circuit files (`netcarve diagram FILE`: exit 3, one line)", "",
              "| damage | message contains |", "|---|---|"]
    lines += [f"| {case} | {_cell(text)} |" for case, (_, text) in t.MALFORMED.items()]
    lines += ["", "### Exceptions reaching the error boundary", "",
              "| exception | exit | message contains |", "|---|---|---|"]
    lines += [f"| {_cell(_describe(exc))} | {code} | {_cell(text)} |"
              for exc, code, text in t.BOUNDARY_CASES]
    lines += ["| any other exception (a bug) | 1 | `This is a bug in netcarve`, traceback kept |",
              "", "### Devices (`--device` on a machine without CUDA: exit 2, one line)", "",
              "| --device | message contains |", "|---|---|"]
    lines += [f"| {_cell(device)} | {_cell(text)} |" for device, text in t.DEVICE_CASES]
    import test_hostile_inputs as h

    lines += ["", "### Hostile and mistaken inputs (`tests/test_hostile_inputs.py`)",
              "", "Each row: exit code, and the text of the one `error:` line (for exit 0: of the "
              "output). A failed run leaves no output folder; a pickle payload never runs; the "
              "bundled weights are unchanged."]
    for title, cases in h.SECTIONS.items():
        lines += ["", f"#### {title}", "", "| case | arguments | exit | message contains |",
                  "|---|---|---|---|"]
        lines += [f"| {case} | {_cell(args)} | {code} | {_cell(text)} |"
                  for case, args, code, text in cases]
    return "\n".join(lines) + "\n"


def render(doc: str) -> str:
    """``doc`` with the text between the markers replaced by :func:`tables`."""
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{tables()}{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {DOC}")
