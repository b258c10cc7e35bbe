"""The ablation tables written out: GitHub Markdown, LaTeX (booktabs) and CSV, each file atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.notes import ARM_SD, DASH, MISSING, NO_TEST, NO_VAL
from istr.io import atomic_write_text


def format_p(p: float) -> str:
    """A p-value as every table prints it."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _is_best(table: pd.DataFrame, label: str, col: str) -> bool:
    return label in table.attrs.get("best", {}).get(col, [])


def to_markdown(table: pd.DataFrame) -> str:
    """A hand-written GitHub pipe table; best means in `**bold**`, footnotes below."""
    header = [table.index.name or "arm", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|"]
    for label, row in table.iterrows():
        cells = [f"**{v}**" if _is_best(table, label, col) else str(v) for col, v in row.items()]
        lines.append("| " + " | ".join([str(label), *cells]).replace("\n", " ") + " |")
    notes = [f"{m} {t}" for m, t in table.attrs.get("footnotes", {}).items()]
    notes.extend(table.attrs.get("notes", []))
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"

_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def _latex(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(c, c) for c in str(text))
    return (
        out.replace("±", r"$\pm$")
        .replace("Δ", r"$\Delta$")
        .replace(DASH, "---")
        .replace(MISSING, r"\textsuperscript{\dag}")
        .replace(NO_TEST, r"\textsuperscript{\ddag}")
        .replace(ARM_SD, r"\textsuperscript{\S}")
        .replace(NO_VAL, r"\textsuperscript{\P}")
        .replace("σ", r"$\sigma$")
        .replace("²", r"\textsuperscript{2}")
        .replace("√", r"$\surd$")
        .replace("·", r"$\cdot$")
        .replace("−", "-")
        .replace("α", r"$\alpha$")
        .replace("×", r"$\times$")
        .replace("<", r"$<$")
    )


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular via `Styler.to_latex(hrules=True)`; best means in `\\textbf{}`, footnotes and notes after
    it."""
    body = {}
    for col in table.columns:
        body[_latex(col)] = [
            rf"\textbf{{{_latex(v)}}}" if _is_best(table, label, col) else _latex(v) for label, v in table[col].items()
        ]
    out = pd.DataFrame(body, index=[_latex(lab) for lab in table.index])
    tex = out.style.to_latex(hrules=True, column_format="l" + "r" * len(out.columns))
    notes = [_latex(f"{m} {t}") for m, t in table.attrs.get("footnotes", {}).items()]
    notes.extend(_latex(note) for note in table.attrs.get("notes", []))
    if notes:
        tex += "{\\footnotesize " + r" \\ ".join(notes) + "}\n"
    return tex


def to_csv(table: pd.DataFrame) -> str:
    """The table's numbers (`attrs["numbers"]`), one row per table row: numeric columns, NaN left empty."""
    return pd.DataFrame(table.attrs["numbers"]).to_csv(index=False)


def write_table(table: pd.DataFrame, out: Path, name: str) -> None:
    """The table as .md, .tex and .csv, each written atomically: an interrupted run leaves no half table."""
    atomic_write_text(out / f"{name}.md", to_markdown(table))
    atomic_write_text(out / f"{name}.tex", to_latex(table))
    atomic_write_text(out / f"{name}.csv", to_csv(table))
