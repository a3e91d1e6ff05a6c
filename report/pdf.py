"""A4 PDF with reportlab: real (searchable) text in the embedded IPAexGothic, charts as images.

reportlab over the alternatives: it is pure pip (no system pango/cairo as WeasyPrint needs),
embeds a TrueType font by file path with a ToUnicode map (so the PDF's text can be extracted and
searched), and lays out flowing text and tables across pages, which matplotlib's PdfPages cannot.
"""
from __future__ import annotations

import io

from reportlab.lib import colors
from reportlab.lib.enums import TA_LEFT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.platypus import (Image, KeepTogether, ListFlowable, ListItem, PageBreak as RLPageBreak,
                                Paragraph as RLParagraph, SimpleDocTemplate, Spacer, Table as RLTable, TableStyle)
from xml.sax.saxutils import escape

from report.document import (Bullets, Chart, Document, Heading, KeyFigures, PageBreak, Paragraph,
                                       Table)
from report.fonts import reportlab_font

NAVY = colors.HexColor("#1f4e79")
MARGIN = 18 * mm


def _styles(font: str, language: str) -> dict[str, ParagraphStyle]:
    wrap = "CJK" if language == "ja" else None     # Japanese breaks between any two characters
    base = ParagraphStyle("body", fontName=font, fontSize=9.5, leading=15, alignment=TA_LEFT, wordWrap=wrap,
                          spaceAfter=4)
    return {
        "title": ParagraphStyle("title", parent=base, fontSize=20, leading=26, textColor=NAVY, spaceAfter=4),
        "subtitle": ParagraphStyle("subtitle", parent=base, fontSize=9, textColor=colors.HexColor("#5b6b7c"),
                                   spaceAfter=10),
        "h1": ParagraphStyle("h1", parent=base, fontSize=15, leading=20, textColor=NAVY, spaceBefore=2,
                             spaceAfter=8, borderPadding=(0, 0, 3, 0), keepWithNext=1),
        "h2": ParagraphStyle("h2", parent=base, fontSize=11.5, leading=16, textColor=colors.HexColor("#1d2733"),
                             spaceBefore=8, spaceAfter=4, keepWithNext=1),   # never a heading alone at a page foot
        "body": base,
        "lead": ParagraphStyle("lead", parent=base, fontSize=10.5, leading=16),
        "note": ParagraphStyle("note", parent=base, fontSize=8.8, leading=13, textColor=colors.HexColor("#8a5a00"),
                               backColor=colors.HexColor("#fff6e0"), borderPadding=4, spaceBefore=4, spaceAfter=8),
        "small": ParagraphStyle("small", parent=base, fontSize=8.5, leading=12),
        "aid": ParagraphStyle("aid", parent=base, fontSize=8.6, leading=12.5, textColor=colors.HexColor("#47586b"),
                              spaceAfter=10),
        "finding": ParagraphStyle("finding", parent=base, fontSize=10.5, leading=17),
        "cell": ParagraphStyle("cell", parent=base, fontSize=8.2, leading=11, spaceAfter=0),
        "cell_num": ParagraphStyle("cell_num", parent=base, fontSize=8.2, leading=11, spaceAfter=0, alignment=2),
        "cell_head": ParagraphStyle("cell_head", parent=base, fontSize=8.2, leading=11, spaceAfter=0,
                                    textColor=colors.white),
        "cell_head_num": ParagraphStyle("cell_head_num", parent=base, fontSize=8.2, leading=11, spaceAfter=0,
                                        textColor=colors.white, alignment=2),
        "kpi_label": ParagraphStyle("kpi_label", parent=base, fontSize=8.2, leading=11,
                                    textColor=colors.HexColor("#5b6b7c"), spaceAfter=1),
        "kpi_value": ParagraphStyle("kpi_value", parent=base, fontSize=14, leading=18, textColor=NAVY, spaceAfter=0),
    }


def _p(text: str, style: ParagraphStyle) -> RLParagraph:
    return RLParagraph(escape(text), style)


def _display_width(text: str) -> int:
    """Width in half-width characters: CJK and full-width characters count twice."""
    return sum(2 if ord(ch) >= 0x2E80 else 1 for ch in str(text))


def _column_widths(block: Table, width: float) -> list[float]:
    """Columns as wide as their longest cell (amounts like 2,799,874円 must not wrap); headers get
    their full width when the table fits, otherwise they may wrap onto two lines."""
    n = len(block.header)
    if not n:
        return []
    cells = [max([6, *(_display_width(row[i]) + 1 for row in block.rows if i < len(row))]) for i in range(n)]
    heads = [_display_width(h) for h in block.header]
    need = [max(c, h) for c, h in zip(cells, heads)]
    # ~4.6 pt per half-width character at 8.2 pt, plus 12 pt of cell padding
    if sum(w * 4.6 + 12 for w in need) > width:
        need = [max(c, (h + 1) // 2) for c, h in zip(cells, heads)]
    total = sum(need)
    return [width * w / total for w in need]


def _table(block: Table, s: dict, width: float) -> list:
    numeric = block.numeric or (False,) * len(block.header)
    data = [[_p(h, s["cell_head_num"] if n else s["cell_head"]) for h, n in zip(block.header, numeric)]]
    for row in block.rows:
        data.append([_p(cell, s["cell_num"] if n else s["cell"]) for cell, n in zip(row, numeric)])
    table = RLTable(data, colWidths=_column_widths(block, width), repeatRows=1)
    table.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), NAVY),
        ("LINEBELOW", (0, 1), (-1, -1), 0.4, colors.HexColor("#d5dbe2")),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 3), ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
    ]))
    out = []
    if block.title:
        out.append(_p(block.title, s["h2"]))
    out += [table, Spacer(1, 8)]
    return out


def _key_figures(block: KeyFigures, s: dict, width: float) -> list:
    cells = [[_p(label, s["kpi_label"]), _p(value, s["kpi_value"])] for label, value in block.items]
    per_row = 3
    rows = [cells[i:i + per_row] for i in range(0, len(cells), per_row)]
    rows[-1] += [""] * (per_row - len(rows[-1]))
    table = RLTable(rows, colWidths=[width / per_row] * per_row)
    table.setStyle(TableStyle([
        ("BOX", (0, 0), (-1, -1), 0.5, colors.HexColor("#dde3ea")),
        ("INNERGRID", (0, 0), (-1, -1), 0.5, colors.HexColor("#dde3ea")),
        ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#f8fafc")),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 7),
    ]))
    return [table, Spacer(1, 10)]


def _chart(block: Chart, s: dict, width: float) -> list:
    reader = ImageReader(io.BytesIO(block.png))
    w_px, h_px = reader.getSize()
    w = width * block.width_ratio
    image = Image(io.BytesIO(block.png), width=w, height=w * h_px / w_px)
    return [KeepTogether([image, _p(block.aid, s["aid"])])]


def render_pdf(doc: Document) -> bytes:
    font = reportlab_font()
    s = _styles(font, doc.language)
    buffer = io.BytesIO()
    template = SimpleDocTemplate(buffer, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=16 * mm,
                                 bottomMargin=16 * mm, title=doc.title, subject=doc.subtitle, author="cvseg",
                                 lang=doc.language)
    width = A4[0] - 2 * MARGIN

    def footer(canvas, _doc):
        canvas.saveState()
        canvas.setFont(font, 7.5)
        canvas.setFillColor(colors.HexColor("#7b8794"))
        canvas.drawString(MARGIN, 9 * mm, f"{doc.title} — {doc.subtitle}")
        canvas.drawRightString(A4[0] - MARGIN, 9 * mm, f"{canvas.getPageNumber()}")
        canvas.restoreState()

    story: list = [_p(doc.title, s["title"]), _p(doc.subtitle, s["subtitle"])]
    for block in doc.blocks:
        if isinstance(block, Heading):
            story.append(_p(block.text, s["h1"] if block.level == 1 else s["h2"]))
        elif isinstance(block, Paragraph):
            story.append(_p(block.text, s.get(block.style, s["body"])))
        elif isinstance(block, Bullets):
            style = s["finding"] if block.numbered else s["body"]
            story.append(ListFlowable([ListItem(_p(item, style), leftIndent=14) for item in block.items],
                                      bulletType="1" if block.numbered else "bullet", start="1" if block.numbered else "•",
                                      bulletFontName=font, bulletFontSize=style.fontSize, leftIndent=14))
            story.append(Spacer(1, 6))
        elif isinstance(block, Chart):
            story += _chart(block, s, width)
        elif isinstance(block, Table):
            story += _table(block, s, width)
        elif isinstance(block, KeyFigures):
            story += _key_figures(block, s, width)
        elif isinstance(block, PageBreak):
            story.append(RLPageBreak())
        else:
            raise TypeError(f"unknown report block {type(block).__name__}")
    template.build(story, onFirstPage=footer, onLaterPages=footer)
    return buffer.getvalue()
