"""The README's method table is generated from the registry, never hand-kept."""

from pathlib import Path

from mergelab.methods.docs import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_current():
    text = README.read_text()
    start = text.index("<!-- methods-table:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- methods-table:end -->")
    assert text[start:end] == methods_markdown(), "run `python -m mergelab.methods.docs README.md`"
