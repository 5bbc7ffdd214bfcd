"""Rendering the report's blocks: Markdown, a self-contained HTML page (images embedded), CSV, plain text.

Text in a block is data (dataset, class and model names, paths, error messages) with the
report's own emphasis marked out of band (`bold`, `code`, `em`: control characters no name
holds), so each renderer escapes every character of the data for its format and adds the
emphasis itself: a dataset named `<script>` or `=HYPERLINK(...)` is shown, never run.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from pathlib import Path
from typing import Any

from tlfeat.errors import formula_safe, printable

_BOLD, _CODE, _EM = "\x02", "\x03", "\x04"
_MARKS = {_BOLD: ("**", "<b>", "</b>"), _CODE: ("`", "<code>", "</code>"), _EM: ("*", "<i>", "</i>")}
_CONTROL = re.compile(r"[\x00-\x01\x05-\x1f\x7f]")


def bold(text: Any) -> str:
    return f"{_BOLD}{_data(text)}{_BOLD}"


def code(text: Any) -> str:
    return f"{_CODE}{_data(text)}{_CODE}"


def em(text: Any) -> str:
    return f"{_EM}{_data(text)}{_EM}"


def _data(text: Any) -> str:
    """A value as data: printable, on one line, without the marks' characters."""
    return _CONTROL.sub(" ", printable(str(text))).translate({ord(m): "?" for m in _MARKS})


def _spans(text: Any) -> list[tuple[str, str]]:
    """(mark or "", printable text) pieces of a block's text; a mark left open ends with its piece."""
    out: list[tuple[str, str]] = []
    mark, current = "", list[str]()
    for ch in str(text):
        if ch in _MARKS:
            out.append((mark, "".join(current)))
            mark, current = ("" if mark == ch else ch if not mark else mark), list[str]()
            continue
        current.append(ch)
    out.append((mark, "".join(current)))
    return [(m, _data(t)) for m, t in out if t]


def _lines(text: Any) -> str:
    """A code block's text: each line printable, the lines kept."""
    return "\n".join(printable(line) for line in str(text).splitlines())


def plain(text: Any) -> str:
    """Text without emphasis, for a terminal."""
    return "".join(t for _, t in _spans(text))


# --------------------------------------------------------------------------- Markdown

_MD_SPECIAL = set("\\`*[]<>|#!~&$")


def _md_escape(text: str) -> str:
    out = []
    for k, ch in enumerate(text):
        if ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch == "_" and not _inside_word(text, k):
            out.append("\\_")
        else:
            out.append(ch)
    return "".join(out)


def _inside_word(text: str, k: int) -> bool:
    """Is the run of underscores at k inside a word (`mobilenet_v2__mnist`)? Then it is never emphasis."""
    start, end = k, k
    while start > 0 and text[start - 1] == "_":
        start -= 1
    while end < len(text) - 1 and text[end + 1] == "_":
        end += 1
    return start > 0 and end < len(text) - 1 and text[start - 1].isalnum() and text[end + 1].isalnum()


def _md_code(text: str) -> str:
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    cell = text.replace("|", "\\|")  # a table cell ends at |, in code spans too
    return f"{fence}{pad}{cell}{pad}{fence}"


def md(text: Any) -> str:
    """Inline Markdown of a block's text: data escaped, the report's own emphasis kept."""
    out = []
    for mark, piece in _spans(text):
        if mark == _CODE:
            out.append(_md_code(piece))
        elif mark:
            out.append(f"{_MARKS[mark][0]}{_md_escape(piece)}{_MARKS[mark][0]}")
        else:
            out.append(_md_escape(piece))
    return "".join(out)


def markdown(sections: list[tuple[str, Any]]) -> str:
    lines: list[str] = []
    previous = ""
    for kind, payload in sections:
        if previous == "li" and kind != "li":
            lines.append("")
        if kind == "h1":
            lines += [f"# {md(payload)}", ""]
        elif kind == "h2":
            lines += [f"## {md(payload)}", ""]
        elif kind == "p":
            lines += [md(payload), ""]
        elif kind == "li":
            lines.append(f"- {md(payload)}")
        elif kind == "code":
            body = _lines(payload)
            fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", body)), default=0) + 1)
            lines += [fence, body, fence, ""]
        elif kind == "img":
            title, path = payload
            lines += [f"![{md(title)}](plots/{path.name})", ""]
        elif kind == "table":
            header, body = payload
            lines += ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in body]
            lines.append("")
        previous = kind
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- HTML


def _inline(text: Any) -> str:
    out = []
    for mark, piece in _spans(text):
        escaped = html.escape(piece, quote=True)
        out.append(f"{_MARKS[mark][1]}{escaped}{_MARKS[mark][2]}" if mark else escaped)
    return "".join(out)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;white-space:nowrap}th{background:#f2f2f2}"
    "tbody tr:nth-child(even){background:#fafafa}img{max-width:100%;border:1px solid #ddd}"
    "pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}h2{margin-top:1.6em;"
    "border-bottom:1px solid #eee}.wide{overflow-x:auto}figure{margin:1em 0}figcaption{color:#555;font-size:13px}"
)


def page(sections: list[tuple[str, Any]], title: str) -> str:
    body: list[str] = []
    in_list = False
    for kind, payload in sections:
        if kind != "li" and in_list:
            body.append("</ul>")
            in_list = False
        if kind in ("h1", "h2", "p"):
            tag = kind
            body.append(f"<{tag}>{_inline(payload)}</{tag}>")
        elif kind == "li":
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(payload)}</li>")
        elif kind == "code":
            body.append(f"<pre>{html.escape(_lines(payload))}</pre>")
        elif kind == "img":
            caption, path = payload
            data = base64.b64encode(Path(path).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{_inline(plain(caption))}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline(caption)}</figcaption></figure>"
            )
        elif kind == "table":
            header, rows_ = payload
            head = "".join(f"<th>{_inline(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in rows_)
            body.append(f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table></div>")
    if in_list:
        body.append("</ul>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>tlfeat report: {_inline(plain(title))}"
        f"</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------- CSV and LaTeX


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text, on one line (`formula_safe` of the printable text)."""
    return formula_safe(printable(value)) if isinstance(value, str) else value


def csv_table(fields: list[str], rows_: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows_:
        writer.writerow({k: csv_cell(row.get(k, "")) for k in fields})
    return buf.getvalue()


def csv_text(items: list[dict[str, Any]]) -> str:
    """Every run at full precision (floats as Python prints them: shortest exact form)."""
    fields = [k for k in (items[0] if items else {}) if not k.startswith("_")]
    cleaned = [
        {k: ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k]) for k in fields}
        for r in items
    ]
    return csv_table(fields, cleaned)


_TEX = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def tex(text: Any) -> str:
    """Text for LaTeX: every special character escaped once, emphasis dropped."""
    return "".join(_TEX.get(ch, ch) for ch in plain(text))
