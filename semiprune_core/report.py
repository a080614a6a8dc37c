"""The report's figures and page: arrays in, PNG bytes and one self-contained HTML file out.

Every figure is embedded as a base64 PNG, so ``report.html`` can be mailed, attached to a ticket
or opened from a Prefect artifact without the files next to it.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import numpy as np


def _figure(width: float = 7.0, height: float = 3.6):
    # matplotlib's object API, not pyplot: no global registry of open figures, so a figure that
    # fails half-drawn is not left behind in a long-lived process (the flow, a served run)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def score_histograms(oos: np.ndarray, ins: np.ndarray, name: str, kept: np.ndarray) -> bytes:
    """The score from the unseen model next to the in-sample one, kept and pruned stacked."""
    fig, axes = _figure(9, 3.4)
    axes.remove()
    axs = fig.subplots(1, 2, sharey=True)
    for ax, values, label in zip(axs, (oos, ins), (f"oos_{name} (unseen model)", f"ins_{name} (models that saw it)")):
        finite = np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=40) if finite.any() else 10
        ax.hist([values[finite & kept], values[finite & ~kept]], bins=bins, stacked=True,
                label=["kept", "pruned"], color=["#3b7dd8", "#d8603b"])
        ax.set_xlabel(label)
    axs[0].set_ylabel("samples")
    axs[0].legend()
    return _png(fig)


def class_counts(class_names: list[str], kept: np.ndarray, pruned: np.ndarray) -> bytes:
    fig, ax = _figure(8, 3.4)
    x = np.arange(len(class_names))
    ax.bar(x, kept, color="#3b7dd8", label="kept")
    ax.bar(x, pruned, bottom=kept, color="#d8603b", label="pruned")
    ax.set_xticks(x, class_names, rotation=30, ha="right")
    ax.set_ylabel("samples")
    ax.legend()
    return _png(fig)


def confusion(matrix: np.ndarray, class_names: list[str]) -> bytes:
    """Rows: hidden true label; columns: pseudo-label; cells: share of the row."""
    fig, ax = _figure(6.5, 5.5)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(matrix):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("pseudo-label")
    ax.set_ylabel("true label (hidden from the method)")
    return _png(fig)


def accuracy_vs_ratio(rows: list[dict]) -> bytes:
    """One line per strategy: final-epoch test accuracy against the pruning ratio."""
    fig, ax = _figure(7, 3.6)
    for strategy in sorted({r["strategy"] for r in rows}):
        points = sorted((r["ratio"], r["test_accuracy"]) for r in rows
                        if r["strategy"] == strategy and r.get("test_accuracy") is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=strategy)
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def image_grid(images: np.ndarray, rows: list[str], captions: list[list[str]]) -> bytes:
    """``images`` (R, K, C, H, W) uint8 (missing cells all zero), one row per class with its name;
    ``captions[r]`` names the filled cells of row r, which come first.

    The cells are pasted into one mosaic drawn by one ``imshow`` (a subplot per cell cost ~2 s for
    two 10 x 8 grids, most of a cached run's time).
    """
    n_rows, n_cols, channels, h, w = images.shape
    cell_w, cell_h = w + max(2, w // 7), h + max(8, h // 3)  # room for a caption under each image
    mosaic = np.full((n_rows * cell_h, n_cols * cell_w, channels), 255, np.uint8)
    for r in range(n_rows):
        for c in range(len(captions[r])):
            mosaic[r * cell_h : r * cell_h + h, c * cell_w : c * cell_w + w] = images[r, c].transpose(1, 2, 0)
    fig, ax = _figure(1.1 * n_cols + 1.4, 1.25 * n_rows + 0.3)
    gray = channels == 1
    ax.imshow(mosaic[..., 0] if gray else mosaic, cmap="gray" if gray else None, vmin=0, vmax=255, interpolation="nearest")
    for r in range(n_rows):
        for c, caption in enumerate(captions[r]):
            ax.text(c * cell_w + w / 2, r * cell_h + h + 0.5, caption, ha="center", va="top", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([r * cell_h + h / 2 for r in range(n_rows)], rows, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _png(fig)


@dataclass
class Page:
    """A report page: a title, then sections of paragraphs, tables and figures, in order."""

    title: str
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, png: bytes, caption: str) -> None:
        data = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def html(self) -> str:
        # the body records how many figures the browser decoded: a headless check reads it back
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 1em 0 2em; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
</style></head>
<body>
<h1>{html.escape(self.title)}</h1>
{chr(10).join(self.parts)}
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length + "/" + imgs.length;
}});
</script>
</body></html>
"""
