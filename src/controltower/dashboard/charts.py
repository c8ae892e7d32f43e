"""Small bar charts as inline SVG, drawn on the server: no script, no dependency.

Each chart is a ``<figure>`` whose SVG has a title and an ``aria-label`` and whose numbers
are repeated in a table (screen readers and copy-paste get the data, not a picture).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

DASH = "\u2013"
WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 560, 200, 64, 30, 14


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return DASH
    if unit == "%":
        return f"{value * 100:.0f}%"
    if unit == "s":
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"
    text = f"{value:,.2f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def bar_chart(
    title: str,
    points: Sequence[tuple[str, float | None]],
    *,
    unit: str = "",
    baseline: float | None = None,
    target: float | None = None,
) -> Markup:
    """One bar per label (days, oldest first); missing values leave a gap, not a zero."""
    values = [v for _, v in points if v is not None]
    top = max([*values, baseline or 0.0, target or 0.0, 0.0])
    if unit == "%":
        top = max(top, 1.0)
    top = top * 1.1 or 1.0
    plot_w, plot_h = WIDTH - PAD_LEFT - 8, HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / max(1, len(points))
    bar_w = max(2.0, step * 0.7)
    every = max(1, -(-len(points) // 7))  # at most about seven date labels

    def y(v: float) -> float:
        return PAD_TOP + plot_h - (v / top) * plot_h

    parts = [
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}" class="chart">',
        f"<title>{escape(title)}</title>",
        f'<line x1="{PAD_LEFT}" y1="{y(0):.1f}" x2="{WIDTH - 8}" y2="{y(0):.1f}" class="axis"/>',
        f'<text x="{PAD_LEFT - 6}" y="{y(top / 1.1):.1f}" class="tick" text-anchor="end">'
        f"{escape(fmt(top / 1.1, unit))}</text>",
        f'<text x="{PAD_LEFT - 6}" y="{y(0):.1f}" class="tick" text-anchor="end">0</text>',
    ]
    for i, (label, value) in enumerate(points):
        x = PAD_LEFT + i * step + (step - bar_w) / 2
        if value is not None:
            h = max(1.0, y(0) - y(value))
            parts.append(
                f'<rect x="{x:.1f}" y="{y(0) - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" class="bar">'
                f"<title>{escape(label)}: {escape(fmt(value, unit))}</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - 8}" class="tick" text-anchor="middle">'
                f"{escape(label[5:])}</text>"
            )
    for name, level in (("baseline", baseline), ("target", target)):
        if level is not None:
            parts.append(
                f'<line x1="{PAD_LEFT}" y1="{y(level):.1f}" x2="{WIDTH - 8}" y2="{y(level):.1f}" '
                f'class="{name}"><title>{name}: {escape(fmt(level, unit))}</title></line>'
            )
    parts.append("</svg>")
    legend = []
    if baseline is not None:
        legend.append(f'<span class="key baseline">baseline {escape(fmt(baseline, unit))}</span>')
    if target is not None:
        legend.append(f'<span class="key target">target {escape(fmt(target, unit))}</span>')
    rows = "".join(
        f"<tr><th scope='row'>{escape(label)}</th><td>{escape(fmt(value, unit))}</td></tr>"
        for label, value in points
        if value is not None
    )
    table = (
        f"<details><summary>Numbers</summary><table class='compact'><thead><tr><th scope='col'>day</th>"
        f"<th scope='col'>{escape(title)}</th></tr></thead>"
        f"<tbody>{rows or '<tr><td colspan=2>no data</td></tr>'}"
        f"</tbody></table></details>"
    )
    return Markup(
        f'<figure class="chart-box"><figcaption>{escape(title)} {" ".join(legend)}</figcaption>'
        f"{''.join(parts)}{table}</figure>"
    )
