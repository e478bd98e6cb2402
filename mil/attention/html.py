"""A static HTML report: index.html plus one page per patient, PNG figures beside them.

Every string that comes from data (patient ids, labels, diagnoses, paths) goes through `esc`, so a patient
called `<script>` is shown, not run. Pages need no server and no network: open index.html in any browser.
"""

from __future__ import annotations

import hashlib
import html
import re
from pathlib import Path

from mil.atomic import atomic_write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0; }
.ok { color: #1e8449; } .wrong { color: #c0392b; font-weight: bold; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def patient_slug(patient_id: str) -> str:
    """A file name for any patient id: readable part plus a hash, so distinct ids never collide."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", patient_id).strip("._")[:40] or "patient"
    return f"{readable}-{hashlib.sha1(patient_id.encode()).hexdigest()[:8]}"


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def figure(src: str, caption: str) -> str:
    return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def table(header: list[str], rows: list[list], raw_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are escaped except the columns in raw_columns (links this module built)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if j in raw_columns else esc(c)}</td>" for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def write_page(path: Path, title: str, body: str) -> Path:
    atomic_write_text(path, page(title, body))
    return path
