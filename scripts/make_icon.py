"""Draw the pack's icon (docs/images/icon.png, the Comfy Registry's [tool.comfy] Icon): a designed mark, no model
output. Deterministic; run it again only when the design changes.

    python scripts/make_icon.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ICON = Path(__file__).resolve().parents[1] / "docs" / "images" / "icon.png"
SIZE = 256


def draw() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    top, bottom = (38, 70, 140), (210, 90, 150)  # the thumbnails' Lite blue to Pro magenta
    for y in range(SIZE):
        t = y / (SIZE - 1)
        d.line([(0, y), (SIZE, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    d.rounded_rectangle([28, 28, SIZE - 28, SIZE - 28], radius=28, outline=(255, 255, 255), width=8)
    font = ImageFont.load_default(size=120)
    d.text((SIZE // 2, SIZE // 2 - 6), "K5", font=font, fill=(255, 255, 255), anchor="mm")
    return img


def main() -> None:
    ICON.parent.mkdir(parents=True, exist_ok=True)
    draw().save(ICON, optimize=True)
    print(f"wrote {ICON}")


if __name__ == "__main__":
    main()
