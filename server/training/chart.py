"""``training.svg`` next to ``training.json``: per-epoch train loss, dev loss and dev accuracy of a run.

A plain SVG written from the record (no plotting dependency in the server distribution: matplotlib is only in
the ``bench`` extra); any browser shows it. Losses share the left axis, the accuracy (0..1) the right one.
"""

from __future__ import annotations

from html import escape

W, H, PAD = 640, 360, 48
SERIES = (("train_loss", "train loss", "#1f77b4", "loss"), ("eval_loss", "dev loss", "#ff7f0e", "loss"),
          ("eval_accuracy", "dev accuracy", "#2ca02c", "accuracy"))


def training_svg(record: dict) -> str:
    history = record.get("history") or []
    epochs = [h["epoch"] for h in history]
    losses = [h[k] for h in history for k in ("train_loss", "eval_loss") if h.get(k) is not None]
    top = max(losses, default=1.0) * 1.05 or 1.0
    x_max = max(epochs, default=1)

    def xy(epoch: float, value: float, scale: float) -> str:
        x = PAD + (epoch - 1) / max(1, x_max - 1) * (W - 2 * PAD)
        y = H - PAD - value / scale * (H - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<line x1="{W - PAD}" y1="{PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">epoch (1..{x_max}; best {record.get("best_epoch")})'
             '</text>',
             f'<text x="{PAD - 4}" y="{PAD - 6}" text-anchor="end">loss {top:.3g}</text>',
             f'<text x="{W - PAD + 4}" y="{PAD - 6}">accuracy 1</text>']
    for i, (key, name, colour, axis) in enumerate(SERIES):
        points = [xy(h["epoch"], h[key], top if axis == "loss" else 1.0) for h in history if h.get(key) is not None]
        if not points:
            continue
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>')
        parts.append(f'<text x="{PAD + 8 + 130 * i}" y="{PAD - 20}" fill="{colour}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
