"""The report's one font: IPAexGothic, shipped as a TTF inside the ``matplotlib-fontja`` wheel.

It covers Japanese and Latin text, so charts and the PDF never fall back to a font without
Japanese glyphs (no "tofu" boxes), and it is TrueType (not CFF), which reportlab can embed.
Both matplotlib and reportlab get it by file path: nothing depends on fonts installed on the
machine.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from core.errors import UserError

FONT_NAME = "IPAexGothic"


class FontMissingError(UserError, RuntimeError):
    """The Japanese font is not installed; the message says how to install it."""


@lru_cache(maxsize=1)
def font_path() -> Path:
    try:
        import matplotlib_fontja
    except ImportError:
        raise FontMissingError("the report needs the package matplotlib-fontja (IPAexGothic font); "
                               "install the engine again: pip install -e .") from None
    path = Path(matplotlib_fontja.get_font_ttf_path())
    if not path.is_file():
        raise FontMissingError(f"font file {path} is missing; reinstall matplotlib-fontja")
    return path


@lru_cache(maxsize=1)
def matplotlib_font() -> str:
    """Register the TTF with matplotlib's font manager; return its family name."""
    from matplotlib import font_manager

    path = font_path()
    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


@lru_cache(maxsize=1)
def reportlab_font() -> str:
    """Register the TTF with reportlab (embedded, subset) under :data:`FONT_NAME`."""
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    pdfmetrics.registerFont(TTFont(FONT_NAME, str(font_path())))
    return FONT_NAME
