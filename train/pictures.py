"""Pictures drawn for a person: the confusion matrix and a labelled grid of test images.

TensorBoard (train/board.py) and `infer/evaluate.py --out` show the same pictures. TensorBoard's
Time Series shows an image in a card about 230 pixels high and 400 wide, whatever its size; so
both pictures are wide rather than tall, with text at more than half a row's height, which stays
readable at that size (and sharp when the card is opened at full size). Mistakes stand out: every
wrong cell of the matrix is tinted red, even a single image among thousands.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RIGHT, WRONG = (30, 110, 200), (215, 40, 40)  # RGB: correct predictions blue, mistakes red
GRID_LINE, FAINT = (205, 205, 205), (185, 185, 185)


def _tint(color: tuple[int, int, int], strength: float) -> tuple[int, int, int]:
    """`color` mixed into white; strength 0 is white, 1 the full colour."""
    return tuple(int(round(255 - (255 - c) * strength)) for c in color)


def _cell_colour(i: int, j: int, count: int, share: float) -> tuple[tuple[int, int, int], object]:
    """Fill and ink of one matrix cell: the diagonal blue by its share of the row; any mistake red, at least faintly."""
    if i == j:
        return _tint(RIGHT, share), ("white" if share > 0.55 else "black")
    if not count:
        return (255, 255, 255), FAINT
    strength = 0.2 + 0.8 * share**0.5  # square root: 1 % of a row is already clearly red
    return _tint(WRONG, strength), ("white" if strength > 0.6 else "black")


def confusion_matrix(confusion, classes: list[str], title: str | None = None, row: int = 40) -> Image.Image:
    """(C, C) counts, rows the true class and columns the predicted one, as a heat map with the counts written in.

    The last column is each class's accuracy (its recall). `title`, when given, is a line above.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    font = ImageFont.load_default(size=row * 5 // 8)
    cell = max(row * 3 // 2, int(font.getlength(str(confusion.max()))) + row // 3)  # wide enough for "1000"
    names = [f"{i} {name[:12]}" for i, name in enumerate(classes)]
    left = max(int(font.getlength(s)) for s in [*names, "true \\ pred"]) + row // 2
    top = row * (2 if title else 1)
    image = Image.new("RGB", (left + n * cell + 2 * cell, top + n * row + row // 4), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((row // 4, row // 2), title, fill="black", anchor="lm", font=font)
    draw.text((left - row // 4, top - row // 2), "true \\ pred", fill="black", anchor="rm", font=font)
    draw.text((left + n * cell + cell, top - row // 2), "acc", fill="black", anchor="mm", font=font)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    for i in range(n):
        y = top + i * row
        draw.text((left - row // 4, y + row // 2), names[i], fill="black", anchor="rm", font=font)
        draw.text((left + i * cell + cell // 2, top - row // 2), str(i), fill="black", anchor="mm", font=font)
        for j in range(n):
            x = left + j * cell
            fill, ink = _cell_colour(i, j, int(confusion[i, j]), share[i, j])
            draw.rectangle([x, y, x + cell - 1, y + row - 1], fill=fill, outline=GRID_LINE)
            draw.text((x + cell // 2, y + row // 2), str(confusion[i, j]), anchor="mm", font=font, fill=ink)
        total = int(confusion[i].sum())
        accuracy = f"{confusion[i, i] / total:.2f}" if total else "-"
        draw.text((left + n * cell + cell, y + row // 2), accuracy, fill="black", anchor="mm", font=font)
    return image


def labelled_grid(images: np.ndarray, captions: list[tuple[str, str]], columns: int = 5, scale: int = 4) -> Image.Image:
    """(N, 3, H, W) uint8 images, each enlarged `scale` times (nearest: pixels stay pixels) above two caption lines.

    `captions` holds (first line, second line) per image, e.g. ("true cat", "pred dog 93%"): the
    first is written in blue, the second in red.
    """
    n, _, h, w = images.shape
    tile_w, tile_h = w * scale, h * scale
    size = max(10, tile_w // 7)
    font = ImageFont.load_default(size=size)
    while size > 10 and max(font.getlength(text) for pair in captions for text in pair) > tile_w + 6:
        size -= 1  # the largest text that fits under its tile
        font = ImageFont.load_default(size=size)
    line = font.size + 4
    pad = 10
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    grid = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + 2 * line + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(n):
        x = pad + (k % columns) * (tile_w + pad)
        y = pad + (k // columns) * (tile_h + 2 * line + pad)
        grid.paste(Image.fromarray(images[k].transpose(1, 2, 0)).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        first, second = captions[k]
        draw.text((x, y + tile_h + 2), first, fill=RIGHT, font=font)
        draw.text((x, y + tile_h + 2 + line), second, fill=WRONG, font=font)
    return grid
