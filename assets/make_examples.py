"""Draw the example images of the Compare tab (shapes-task scenes) into assets/examples/.

    python assets/make_examples.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
COLORS = {"red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8)}
# file name -> shapes drawn: (shape, color, centre x, centre y, radius)
SCENES = {
    "red-circle-blue-square.png": [("circle", "red", 80, 128, 48), ("square", "blue", 180, 128, 44)],
    "green-triangle.png": [("triangle", "green", 128, 128, 70)],
    "three-shapes.png": [("square", "yellow", 60, 80, 36), ("circle", "blue", 180, 90, 40),
                         ("triangle", "red", 120, 190, 46)],
}


def draw(shapes) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    for shape, color, x, y, r in shapes:
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            pen.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
    return image


def main() -> None:
    out = Path(__file__).resolve().parent / "examples"
    out.mkdir(exist_ok=True)
    for name, shapes in SCENES.items():
        draw(shapes).save(out / name, optimize=True)
        print(out / name)


if __name__ == "__main__":
    main()
