"""The pictures of a report: a labelled image grid (Pillow) and charts (matplotlib)."""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

MAX_CELL = 256  # pixels on the longer side of each grid image: big images are shrunk to it,
MIN_CELL = 128  # small ones (test models) enlarged to this, so the labels fit above them
COMPONENT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in the grid: a header row of column labels, a left column of row labels."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int
    label_width: int = 220
    header_height: int = 36
    gap: int = 4

    @classmethod
    def for_images(cls, rows: int, columns: int, image_size: tuple[int, int]) -> "GridLayout":
        width, height = image_size
        scale = min(max(1.0, MIN_CELL / max(width, height)), MAX_CELL / max(width, height))
        return cls(rows, columns, max(1, round(width * scale)), max(1, round(height * scale)))

    @property
    def size(self) -> tuple[int, int]:
        return (self.label_width + self.columns * (self.cell_width + self.gap) + self.gap,
                self.header_height + self.rows * (self.cell_height + self.gap) + self.gap)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        left = self.label_width + self.gap + column * (self.cell_width + self.gap)
        top = self.header_height + self.gap + row * (self.cell_height + self.gap)
        return left, top, left + self.cell_width, top + self.cell_height

    def to_json(self) -> dict:
        return dict(asdict(self), width=self.size[0], height=self.size[1])


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def image_grid(image_paths: list[list[str]], row_labels: list[str], column_labels: list[str],
               out: Path) -> GridLayout:
    """``image_paths[row][column]``: rows are prompts, columns folders. Writes ``out``; returns the layout."""
    from PIL import Image, ImageDraw

    with Image.open(image_paths[0][0]) as first:
        grid = GridLayout.for_images(len(row_labels), len(column_labels), first.size)
    canvas = Image.new("RGB", grid.size, "white")
    draw = ImageDraw.Draw(canvas)
    header_font, label_font = _font(15), _font(12)
    for column, label in enumerate(column_labels):
        left, _, right, _ = grid.cell_box(0, column)
        while len(label) > 1 and draw.textlength(label, font=header_font) > right - left:
            label = label[:-2] + "…"
        draw.text(((left + right) / 2, grid.header_height / 2), label, fill="black", font=header_font, anchor="mm")
    for row, label in enumerate(row_labels):
        _, top, _, bottom = grid.cell_box(row, 0)
        wrapped = "\n".join(textwrap.wrap(label, width=30)[:max(1, (bottom - top) // 16)])
        draw.multiline_text((8, top + 4), wrapped, fill="black", font=label_font, spacing=3)
        for column in range(len(column_labels)):
            with Image.open(image_paths[row][column]) as image:
                cell = image.convert("RGB").resize((grid.cell_width, grid.cell_height), Image.LANCZOS)
            canvas.paste(cell, grid.cell_box(row, column)[:2])
    canvas.save(out)
    return grid


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def report_chart(labels: list[str], step_seconds: list[dict], sizes_mb: list[dict[str, float]], out: Path,
                 title: str) -> None:
    """Left: median seconds per transformer step (whiskers: min-max); right: size per component, stacked.
    ``title`` states the size drawn (a step's time is only meaningful at its size)."""
    plt = _pyplot()
    figure, (speed, size) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    medians = [spread["median"] for spread in step_seconds]
    errors = [[m - spread["min"] for m, spread in zip(medians, step_seconds)],
              [spread["max"] - m for m, spread in zip(medians, step_seconds)]]
    speed.bar(labels, medians, yerr=errors, capsize=4, color=COMPONENT_COLOURS[0])
    speed.set_ylabel("seconds per transformer step")
    speed.set_title("time per step (median, min-max): taller is slower")  # whichever folder that is
    components = list(dict.fromkeys(name for folder in sizes_mb for name in folder))
    bottoms = [0.0] * len(labels)
    for index, component in enumerate(components):
        values = [folder.get(component, 0.0) for folder in sizes_mb]
        size.bar(labels, values, bottom=bottoms, label=component,
                 color=COMPONENT_COLOURS[index % len(COMPONENT_COLOURS)])
        bottoms = [b + v for b, v in zip(bottoms, values)]
    size.set_ylabel("MB")
    size.set_title("size on disk")
    size.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def benchmark_chart(series: dict[str, dict[int, float]], out: Path, title: str) -> None:
    """Images per second against batch size, one line per runner (the figure GPU articles publish)."""
    plt = _pyplot()
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for index, (runner, seconds_per_call) in enumerate(series.items()):
        batches = sorted(seconds_per_call)
        colour = COMPONENT_COLOURS[index % len(COMPONENT_COLOURS)]
        throughput.plot(batches, [batch / seconds_per_call[batch] for batch in batches], marker="o",
                        label=runner, color=colour)
        latency.plot(batches, [seconds_per_call[batch] / batch for batch in batches], marker="o",
                     label=runner, color=colour)
    all_batches = sorted({batch for seconds_per_call in series.values() for batch in seconds_per_call})
    for axis, label in ((throughput, "images per second"), (latency, "seconds per image")):
        axis.set_xlabel("batch (images per call)")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(all_batches, [str(batch) for batch in all_batches])
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    throughput.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
