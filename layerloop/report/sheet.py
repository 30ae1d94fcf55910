"""The contact sheet: one row per sample, composite | background | foreground on a checkerboard | mask |
key, caption and metadata. ``SheetLayout`` is its pixel geometry (the renderer and the tests both use it);
the drawing helpers are shared with the self-improvement round sheets."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from layerloop.report.stats import flatten_numbers, parse_scores
from layerloop.samples import LayeredSample


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of the contact sheet; the renderer and the tests both use it."""

    cell: int = 192  # square image cell; images are fitted inside, aspect kept
    text_width: int = 460
    margin: int = 12
    gap: int = 8
    pad: int = 6  # vertical padding inside a row
    title_height: int = 50
    header_height: int = 28
    columns: tuple[str, ...] = ("composite", "background", "foreground (RGBA)", "mask",
                                "key · caption · metadata")

    @property
    def row_height(self) -> int:
        return self.cell + 2 * self.pad

    @property
    def width(self) -> int:
        return 2 * self.margin + 4 * (self.cell + self.gap) + self.text_width

    def height(self, rows: int) -> int:
        # An empty sheet still has one row, which says "no samples".
        return self.title_height + self.header_height + max(rows, 1) * self.row_height + self.margin

    def column_x(self, column: int) -> int:
        return self.margin + column * (self.cell + self.gap)

    def row_y(self, row: int) -> int:
        return self.title_height + self.header_height + row * self.row_height

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of an image cell (columns 0-3) or the text cell (column 4)."""
        x0, y0 = self.column_x(column), self.row_y(row) + self.pad
        return x0, y0, x0 + (self.text_width if column == 4 else self.cell), y0 + self.cell


LAYOUT = SheetLayout()
INK, MUTED, PANEL, STRIPE = (25, 25, 25), (105, 105, 105), (226, 226, 226), (244, 244, 246)


def load_font(size: int, mono: bool = False, bold: bool = False) -> ImageFont.ImageFont:
    # DejaVu ships with matplotlib (a dependency), so the sheet looks the same on every machine and
    # renders non-ASCII captions; Pillow's built-in font is the fallback.
    try:
        from matplotlib import font_manager

        family = "DejaVu Sans Mono" if mono else "DejaVu Sans"
        path = font_manager.findfont(font_manager.FontProperties(family=family, weight="bold" if bold else "normal"),
                                     fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except Exception:  # noqa: BLE001 - any font problem must not stop a report
        return ImageFont.load_default(size=size)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    width, height = image.size
    scale = min(cell / width, cell / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Enlarged small images stay blocky on purpose: a report is for checking data, and interpolated
    # pixels would hide edges and halos. Shrinking uses a proper filter, premultiplied for RGBA so that
    # transparent pixels do not bleed their (meaningless) colour into the edges.
    if scale >= 1:
        return image.resize(size, Image.Resampling.NEAREST)
    if image.mode == "RGBA":
        return image.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    return image.resize(size, Image.Resampling.LANCZOS)


def _checkerboard(size: tuple[int, int], square: int = 8) -> Image.Image:
    ys, xs = np.indices((size[1], size[0]))
    light = ((ys // square + xs // square) % 2 == 0)
    return Image.fromarray(np.where(light, 204, 153).astype(np.uint8), "L").convert("RGBA")


def thumbnails(sample: LayeredSample, cell: int) -> list[Image.Image]:
    """The four image cells of a sample: composite, background, foreground on a checkerboard, mask."""
    foreground = _fit(Image.fromarray(sample.foreground, "RGBA"), cell)
    on_checker = Image.alpha_composite(_checkerboard(foreground.size), foreground).convert("RGB")
    return [_fit(Image.fromarray(sample.composite, "RGB"), cell),
            _fit(Image.fromarray(sample.background, "RGB"), cell),
            on_checker,
            _fit(Image.fromarray(sample.mask, "L"), cell).convert("RGB")]


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap by rendered width (characters differ in width, so textwrap's counts are not)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width:  # a word longer than the line: hard break
                cut = max(1, int(len(word) * width / font.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def clip_lines(lines: list[str], limit: int, font: ImageFont.ImageFont, width: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    last = lines[limit - 1]
    while last and font.getlength(last + " …") > width:
        last = last[:-1]
    return lines[:limit - 1] + [last + " …"]


def _describe(sample: LayeredSample, row: dict[str, Any] | None, shard: str) -> list[str]:
    height, width = sample.size or (0, 0)
    details = [f"{sample.kind} · {width}×{height} · {shard}"]
    source, source_id = sample.meta.get("source"), sample.meta.get("source_id")
    if source is not None or source_id is not None:
        details.append(f"source: {'?' if source is None else source} / {'?' if source_id is None else source_id}")
    if sample.meta.get("bbox") is not None:
        details.append(f"bbox: {sample.meta['bbox']}")
    scores = dict(flatten_numbers(sample.meta.get("scores") or parse_scores(row["scores"] if row else None)))
    if scores:
        details.append("scores: " + ", ".join(f"{k}={v:.3g}" for k, v in sorted(scores.items())))
    return details


def draw_text_cell(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], key: str, caption: str,
                   details: list[str], fonts: dict[str, ImageFont.ImageFont]) -> None:
    x0, y0, x1, y1 = box
    width = x1 - x0
    y = y0
    draw.text((x0, y), clip_lines(wrap(key, fonts["key"], width), 1, fonts["key"], width)[0],
              font=fonts["key"], fill=INK)
    y += 22
    detail_lines = [line for d in details for line in wrap(d, fonts["small"], width)]
    detail_height = 16 * len(detail_lines)
    caption_lines = wrap(caption, fonts["text"], width) if caption.strip() else ["(no caption)"]
    room = max(1, (y1 - y - detail_height - 6) // 19)
    for line in clip_lines(caption_lines, room, fonts["text"], width):
        draw.text((x0, y), line, font=fonts["text"], fill=INK if caption.strip() else MUTED)
        y += 19
    y = max(y + 6, y1 - detail_height)  # details sit at the bottom of the cell, under the caption
    for line in detail_lines:
        if y + 14 > y1 + LAYOUT.pad:
            break
        draw.text((x0, y), line, font=fonts["small"], fill=MUTED)
        y += 16


def sheet_fonts(text_size: int) -> dict[str, ImageFont.ImageFont]:
    return {"title": load_font(18, bold=True), "header": load_font(14, bold=True),
            "key": load_font(15, mono=True, bold=True), "text": load_font(text_size), "small": load_font(12)}


def draw_frame(draw: ImageDraw.ImageDraw, layout: SheetLayout, fonts: dict[str, ImageFont.ImageFont],
               title: str, subtitle: str) -> None:
    """The headline, the line under it and the column headers (each clipped to its column)."""
    draw.text((layout.margin, 8), title, font=fonts["title"], fill=INK)
    draw.text((layout.margin, 32), subtitle, font=fonts["small"], fill=MUTED)
    header_y = layout.title_height
    for column, label in enumerate(layout.columns):
        room = layout.text_width if column == 4 else layout.cell
        label = clip_lines(wrap(label, fonts["header"], room), 1, fonts["header"], room)[0]
        draw.text((layout.column_x(column), header_y + 6), label, font=fonts["header"], fill=INK)
    draw.line([(layout.margin, header_y + layout.header_height - 2),
               (layout.width - layout.margin, header_y + layout.header_height - 2)], fill=MUTED, width=1)


def draw_row_cells(sheet: Image.Image, draw: ImageDraw.ImageDraw, layout: SheetLayout, row: int,
                   thumbs: list[Image.Image | None], missing_font: ImageFont.ImageFont | None = None) -> None:
    """Row ``row``'s stripe (every other row: it keeps a wide row's text attached to its images) and its
    four image cells, each thumbnail centred on a grey panel; ``None`` says "missing" instead."""
    if row % 2:
        draw.rectangle([0, layout.row_y(row), layout.width, layout.row_y(row + 1) - 1], fill=STRIPE)
    for column, thumb in enumerate(thumbs):
        x0, y0, x1, y1 = layout.cell_box(row, column)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=PANEL)
        if thumb is None:
            draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "missing", font=missing_font, fill=MUTED, anchor="mm")
        else:
            sheet.paste(thumb, (x0 + (layout.cell - thumb.width) // 2, y0 + (layout.cell - thumb.height) // 2))


def render_contact_sheet(samples: list[tuple[str, LayeredSample]], index_rows: dict[str, dict[str, Any]],
                         title: tuple[str, str], layout: SheetLayout = LAYOUT, empty_note: str = ""
                         ) -> Image.Image:
    """One row per (shard, sample): composite | background | foreground on a checkerboard | mask | text.
    ``title`` is a headline and a smaller line under it; ``empty_note`` explains an empty sheet."""
    fonts = sheet_fonts(15)
    sheet = Image.new("RGB", (layout.width, layout.height(len(samples))), "white")
    draw = ImageDraw.Draw(sheet)
    draw_frame(draw, layout, fonts, *title)

    if not samples:
        x0, y0, _, y1 = layout.cell_box(0, 0)
        draw.text((layout.width // 2, (y0 + y1) // 2 - 12), "no samples", font=load_font(28, bold=True),
                  fill=MUTED, anchor="mm")
        if empty_note:
            draw.text((layout.width // 2, (y0 + y1) // 2 + 22), empty_note, font=fonts["text"], fill=MUTED,
                      anchor="mm")
        return sheet

    for row, (shard, sample) in enumerate(samples):
        draw_row_cells(sheet, draw, layout, row, thumbnails(sample, layout.cell))
        draw_text_cell(draw, layout.cell_box(row, 4), sample.key, sample.caption,
                       _describe(sample, index_rows.get(sample.key), shard), fonts)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of a sheet (Pillow's defaults, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
