"""The method table shown by ``mergelab methods`` and embedded in the README, from the registry."""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticUndefined

from mergelab.methods.base import MethodParams
from mergelab.methods.registry import all_methods


def _param_list(model: type[MethodParams]) -> str:
    parts = []
    for name, f in model.model_fields.items():
        key = f.alias or name
        default = f.default
        if default is PydanticUndefined:
            parts.append(f"{key} (required)")
        else:
            shown = str(default).lower() if isinstance(default, bool) else default
            parts.append(f"{key} ({shown})")
    return ", ".join(parts) or "—"


def method_rows() -> list[dict[str, Any]]:
    """One row per method: name, paper, parameters with defaults, how it uses the base."""
    rows = []
    for m in all_methods():
        n = f"{m.min_experts}" + (f"–{m.max_experts}" if m.max_experts != m.min_experts else "")
        if m.max_experts is None:
            n = f"≥{m.min_experts}"
        rows.append(
            {
                "name": m.name + (f" ({', '.join(m.aliases)})" if m.aliases else ""),
                "summary": m.summary,
                "paper": m.paper,
                "params": _param_list(m.params),
                "model_params": _param_list(m.model_params),
                "base": f"{m.base}; experts {n}",
            }
        )
    return rows


def methods_markdown() -> str:
    """The Markdown table kept between the README's method-table markers."""
    lines = [
        "| method | what it does | paper | global parameters (default) "
        "| per-model parameters (default) | base; experts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in method_rows():
        lines.append(
            f"| `{r['name']}` | {r['summary']} | {r['paper']} | {r['params']} | {r['model_params']} | {r['base']} |"
        )
    return "\n".join(lines) + "\n"


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the table between the README's markers; True if it changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start = text.index("\n", text.index("<!-- methods-table:start")) + 1
    end = text.index("<!-- methods-table:end -->")
    new = text[:start] + methods_markdown() + text[end:]
    if new != text:
        p.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m mergelab.methods.docs [README.md]
    import sys

    print("updated" if update_readme(*sys.argv[1:]) else "up to date")
