"""Render a ``tmux capture-pane -e`` dump (ANSI colours) to HTML with rich, for a headless
chromium screenshot. Usage: ``render_ansi.py IN.ansi OUT.html WIDTH``; prints the line count."""

from __future__ import annotations

import io
import sys

from rich.console import Console
from rich.terminal_theme import MONOKAI
from rich.text import Text

__all__ = ["main"]

PAGE = (
    '<!DOCTYPE html><html><head><meta charset="utf-8"><style>'
    "body{{margin:0;background:#0c0c0c;color:#ddd}}"
    'pre{{margin:0;padding:10px 12px;font-family:"DejaVu Sans Mono",monospace;font-size:14px;'
    "line-height:1.2}}</style></head><body><pre><code>{code}</code></pre></body></html>"
)


def main(src: str, dst: str, width: int) -> int:
    with open(src, encoding="utf-8") as fh:
        lines = fh.read().rstrip("\n").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    console = Console(
        record=True, width=width, file=io.StringIO(), force_terminal=True, color_system="truecolor"
    )
    console.print(Text.from_ansi("\n".join(lines)))
    with open(dst, "w", encoding="utf-8") as fh:
        fh.write(console.export_html(theme=MONOKAI, inline_styles=True, code_format=PAGE))
    return len(lines)


if __name__ == "__main__":
    print(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
