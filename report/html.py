"""Self-contained HTML: CSS inline, charts as base64 PNG data URIs, no external reference."""
from __future__ import annotations

import base64
from html import escape

from report.document import (Bullets, Chart, Document, Heading, KeyFigures, PageBreak, Paragraph,
                                       Table)

CSS = """
body { font-family: "Hiragino Kaku Gothic ProN", "Hiragino Sans", "Yu Gothic", Meiryo, "Noto Sans CJK JP",
       "IPAexGothic", "Segoe UI", Arial, sans-serif; color: #1d2733; margin: 0; background: #f3f5f8; }
main { max-width: 980px; margin: 0 auto; background: #fff; padding: 32px 48px 56px; }
header { border-bottom: 3px solid #1f4e79; margin-bottom: 20px; }
h1.title { font-size: 26px; margin: 0 0 6px; color: #1f4e79; }
p.subtitle { color: #5b6b7c; margin: 0 0 12px; font-size: 13px; }
h2 { font-size: 20px; color: #1f4e79; border-left: 6px solid #1f4e79; padding-left: 10px; margin: 36px 0 12px; }
h3 { font-size: 15px; color: #1d2733; margin: 20px 0 8px; }
p { line-height: 1.7; font-size: 14px; margin: 6px 0 10px; }
p.lead { font-size: 15px; font-weight: bold; }
p.note { color: #8a5a00; background: #fff6e0; border-left: 4px solid #e0a800; padding: 6px 10px; font-size: 13px; }
ol.findings li, ul li { line-height: 1.7; font-size: 14px; margin-bottom: 6px; }
ol.findings li { font-size: 15px; }
figure { margin: 14px 0 22px; }
figure img { width: 100%; height: auto; border: 1px solid #e5e8ec; }
figcaption { font-size: 13px; color: #47586b; margin-top: 4px; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 13px; width: 100%; }
th { background: #1f4e79; color: #fff; padding: 6px 8px; text-align: left; font-weight: normal; }
td { border-bottom: 1px solid #e1e5ea; padding: 5px 8px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.label { font-weight: bold; }
caption { text-align: left; font-weight: bold; padding: 4px 0; }
.kpis { display: grid; grid-template-columns: repeat(3, 1fr); gap: 10px; margin: 8px 0 18px; }
.kpi { border: 1px solid #dde3ea; border-radius: 6px; padding: 10px 12px; background: #f8fafc; }
.kpi .label { font-size: 12px; color: #5b6b7c; }
.kpi .value { font-size: 20px; font-weight: bold; color: #1f4e79; margin-top: 4px; }
@media print { body { background: #fff; } main { padding: 0; } h2 { break-before: page; } }
"""


def _block(block) -> str:
    if isinstance(block, Heading):
        tag = "h2" if block.level == 1 else "h3"
        return f"<{tag}>{escape(block.text)}</{tag}>"
    if isinstance(block, Paragraph):
        return f'<p class="{block.style}">{escape(block.text)}</p>'
    if isinstance(block, Bullets):
        tag = "ol" if block.numbered else "ul"
        css = ' class="findings"' if block.numbered else ""
        return f"<{tag}{css}>" + "".join(f"<li>{escape(i)}</li>" for i in block.items) + f"</{tag}>"
    if isinstance(block, Chart):
        data = base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img alt="{escape(block.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{escape(block.aid)}</figcaption></figure>")
    if isinstance(block, Table):
        numeric = block.numeric or (False,) * len(block.header)
        head = "".join(f'<th class="{"num" if n else ""}">{escape(h)}</th>' for h, n in zip(block.header, numeric))
        body = []
        for row in block.rows:
            cells = []
            for i, (cell, n) in enumerate(zip(row, numeric)):
                css = "num" if n else ("label" if block.emphasis_first and i == 0 else "")
                cells.append(f'<td class="{css}">{escape(cell)}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption = f"<caption>{escape(block.title)}</caption>" if block.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    if isinstance(block, KeyFigures):
        items = "".join(f'<div class="kpi"><div class="label">{escape(label)}</div>'
                        f'<div class="value">{escape(value)}</div></div>' for label, value in block.items)
        return f'<div class="kpis">{items}</div>'
    if isinstance(block, PageBreak):
        return ""
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(doc: Document) -> str:
    body = "\n".join(part for part in (_block(b) for b in doc.blocks) if part)
    return (f'<!DOCTYPE html>\n<html lang="{doc.language}">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f'<header><h1 class="title">{escape(doc.title)}</h1><p class="subtitle">{escape(doc.subtitle)}</p></header>\n'
            f"{body}\n</main>\n</body>\n</html>\n")
