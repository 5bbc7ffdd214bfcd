"""Rendering the report's blocks: Markdown, a self-contained HTML page (images embedded), CSV."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(sections: list[tuple[str, Any]]) -> str:
    lines: list[str] = []
    previous = ""
    for kind, payload in sections:
        if previous == "li" and kind != "li":
            lines.append("")
        if kind == "h1":
            lines += [f"# {payload}", ""]
        elif kind == "h2":
            lines += [f"## {payload}", ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "li":
            lines.append(f"- {payload}")
        elif kind == "code":
            lines += ["```", payload, "```", ""]
        elif kind == "img":
            title, path = payload
            lines += [f"![{title}](plots/{path.name})", ""]
        elif kind == "table":
            header, body = payload
            lines += ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
            lines.append("")
        previous = kind
    return "\n".join(lines).rstrip("\n") + "\n"


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


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
            body.append(f"<pre>{html.escape(payload)}</pre>")
        elif kind == "img":
            caption, path = payload
            data = base64.b64encode(Path(path).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        elif kind == "table":
            header, rows_ = payload
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in rows_)
            body.append(f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table></div>")
    if in_list:
        body.append("</ul>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>tlfeat report: {html.escape(title)}"
        f"</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def csv_text(items: list[dict[str, Any]]) -> str:
    """Every run at full precision (floats as Python prints them: shortest exact form)."""
    fields = [k for k in (items[0] if items else {}) if not k.startswith("_")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in items:
        writer.writerow(
            {k: ("" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k]) for k in fields}
        )
    return buf.getvalue()
