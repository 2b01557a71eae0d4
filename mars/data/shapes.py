"""The MARS-Shapes world: constants, scenes, a renderer and a seeded scene sampler.

Everything here follows /work/shared/SHAPES_SPEC.md (the contract that renderers, generators and
the checker share). Coordinates are px on a 256x256 canvas ("px@256"); every object has an integer
centre (cx, cy) and an integer size s.

Pixel convention: the spec's boxes are passed to Pillow verbatim, and Pillow includes both end
coordinates, so a circle, square or triangle of size s covers s + 1 pixel columns and rows
(a star is narrower: its box is 2 * cos(18 deg) * s/2 wide).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

CANVAS = 256
BACKGROUND = (255, 255, 255)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "purple": (140, 70, 190),
    "black": (30, 30, 30),
}
COLOURS_ZH: dict[str, str] = {
    "red": "红色",
    "orange": "橙色",
    "yellow": "黄色",
    "green": "绿色",
    "blue": "蓝色",
    "purple": "紫色",
    "black": "黑色",
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
SHAPES_ZH: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}

# Size ranges (inclusive) of s in px@256.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (36, 48), "large": (76, 92), "any": (40, 84)}
MARGIN = 8  # px between every object's box and the canvas edge
# The spec asks for boxes >= 10 px apart; Pillow draws both box edges, so 11 in coordinates
# leaves at least 10 blank pixels between two objects.
MIN_GAP = 11

# Relation names as the spec writes them. Each maps to the axis it is about and the sign of
# d = centre(B) - centre(A) when "A <relation> B" holds.
RELATIONS: dict[str, tuple[int, int]] = {
    "left of": (0, +1),
    "right of": (0, -1),
    "above": (1, +1),
    "below": (1, -1),
}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# The relations that name the object met first in reading order (left before right, top before bottom).
READING_ORDER_RELATIONS = ("left of", "above")
RELATION_MIN_OFFSET = 16  # the judging rule
PLACEMENT_MIN_OFFSET = 48  # how clearly training images show a stated relation

HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "star"), ("orange", "triangle")})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

TRAIN_CATEGORIES: tuple[str, ...] = ("single", "two", "counting", "position", "size")
EVAL_CATEGORIES: tuple[str, ...] = TRAIN_CATEGORIES + ("novel",)
COUNTS = (2, 3, 4)


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape: colour and shape names, integer centre and size s (px@256)."""

    colour: str
    shape: str
    cx: int
    cy: int
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The spec's box [cx - s/2, cy - s/2, cx + s/2, cy + s/2]."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def relation_in_reading_order(objects: tuple, relation: str) -> tuple[tuple, str]:
    """"A <relation> B" as (objects, relation) stated so that the object named first is the one met
    first in reading order: "A right of B" -> "B left of A", "A below B" -> "B above A"; a relation
    already in reading order is returned as it is."""
    if relation in READING_ORDER_RELATIONS:
        return objects, relation
    return objects[::-1], INVERSE_RELATION[relation]


@dataclass(frozen=True)
class Scene:
    """A picture and what its canonical caption states.

    - single / novel: one object.
    - two: two objects that differ in colour or shape.
    - counting: n identical (colour, shape) objects.
    - position: objects = (A, B) and the caption says "A <relation> B".
    - size: objects = (A, B) with A small and B large ("a small A and a large B").
    """

    objects: tuple[ShapeObject, ...]
    category: str
    relation: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """The (colour, shape) of every object, in order."""
        return [(o.colour, o.shape) for o in self.objects]

    def to_dict(self) -> dict:
        """A JSON-ready description (the `objects`/`category`/`relation` of captions.jsonl)."""
        return {"category": self.category, "relation": self.relation,
                "objects": [asdict(o) for o in self.objects]}

    def in_reading_order(self) -> Scene:
        """The same picture, a position scene stated in reading order (`relation_in_reading_order`);
        other scenes are returned unchanged."""
        if self.category != "position":
            return self
        objects, relation = relation_in_reading_order(self.objects, self.relation)
        return Scene(objects, self.category, relation)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(objects=tuple(ShapeObject(**o) for o in d["objects"]),
                   category=d["category"], relation=d.get("relation"))


# --------------------------------------------------------------------------- rendering

def shape_polygon(obj: ShapeObject) -> list[tuple[float, float]]:
    """Vertices of a triangle or star exactly as the spec defines them."""
    cx, cy, h = obj.cx, obj.cy, obj.size / 2
    if obj.shape == "triangle":
        return [(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)]
    if obj.shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else 0.5 * h
            a = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    raise ValueError(f"{obj.shape} is not a polygon shape")


def draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject) -> None:
    """Draw one object on a 256x256 canvas (ImageDraw fills without anti-aliasing)."""
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    else:
        draw.polygon(shape_polygon(obj), fill=fill)


def render_scene(scene: Scene, size: int = CANVAS) -> Image.Image:
    """Render a scene as an RGB image of size x size.

    The picture is always drawn at 256x256 and then resized with nearest neighbour, the same
    resampling the checker uses to come back to 256: colours stay flat and, for sizes that divide
    or are multiples of 256, the round trip is exact.
    """
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj)
    if size != CANVAS:
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return img


# --------------------------------------------------------------------------- sampling

def fits_canvas(obj: ShapeObject) -> bool:
    """The object's box keeps MARGIN px from every edge of the canvas."""
    x0, y0, x1, y1 = obj.box
    return min(x0, y0) >= MARGIN and max(x1, y1) <= CANVAS - 1 - MARGIN


def boxes_apart(a: ShapeObject, b: ShapeObject) -> bool:
    """Boxes separated by at least MIN_GAP along some axis."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
    return gap >= MIN_GAP


def _random_centre(rng: random.Random, s: int) -> tuple[int, int]:
    lo = MARGIN + math.ceil(s / 2)
    hi = CANVAS - 1 - MARGIN - math.ceil(s / 2)
    return rng.randint(lo, hi), rng.randint(lo, hi)


def _place(rng: random.Random, pairs: list[tuple[str, str]], sizes: list[int],
           relation: str | None = None, tries: int = 200) -> tuple[ShapeObject, ...] | None:
    """Random non-overlapping placement; for a relation, objects[0] <relation> objects[1].

    Returns None when `tries` random placements all fail (the caller redraws the sizes).
    """
    for _ in range(tries):
        objs: list[ShapeObject] = []
        for (colour, shape), s in zip(pairs, sizes):
            cx, cy = _random_centre(rng, s)
            obj = ShapeObject(colour, shape, cx, cy, s)
            if all(boxes_apart(obj, o) for o in objs):
                objs.append(obj)
            else:
                break
        if len(objs) == len(pairs) and (relation is None or placement_shows(objs[0], objs[1], relation)):
            return tuple(objs)
    return None


def placement_shows(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Training placement rule: the named axis offset is >= 48 px and >= 2x the other axis."""
    axis, sign = RELATIONS[relation]
    d = (b.cx - a.cx, b.cy - a.cy)
    named, other = sign * d[axis], abs(d[1 - axis])
    return named >= PLACEMENT_MIN_OFFSET and named >= 2 * other


def relation_holds(a_centre: tuple[float, float], b_centre: tuple[float, float], relation: str) -> bool:
    """The judging rule of the spec, with d = centre(B) - centre(A)."""
    axis, sign = RELATIONS[relation]
    d = (b_centre[0] - a_centre[0], b_centre[1] - a_centre[1])
    return sign * d[axis] >= RELATION_MIN_OFFSET and abs(d[axis]) > abs(d[1 - axis])


def _two_distinct_pairs(rng: random.Random, pool: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Two (colour, shape) pairs that differ in colour or shape."""
    first, second = rng.sample(pool, 2)
    return [first, second]


def _size(rng: random.Random, kind: str) -> int:
    return rng.randint(*SIZE_RANGES[kind])


def sample_scene(rng: random.Random, category: str | None = None, split: str = "train") -> Scene:
    """Draw a random scene of `category` (uniform over the split's categories when None).

    Held-out (colour, shape) pairs appear only in category `novel`, which exists only in the
    eval split; in every other category, and in the whole train split, they are never drawn.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    categories = TRAIN_CATEGORIES if split == "train" else EVAL_CATEGORIES
    if category is None:
        category = rng.choice(categories)
    if category not in categories:
        raise ValueError(f"category {category!r} is not in the {split} split {categories}")

    pool = TRAIN_PAIRS
    relation = None
    while True:
        if category == "single":
            pairs, sizes = [rng.choice(pool)], [_size(rng, "any")]
        elif category == "novel":
            pairs, sizes = [rng.choice(sorted(HELD_OUT))], [_size(rng, "any")]
        elif category == "two":
            pairs = _two_distinct_pairs(rng, pool)
            sizes = [_size(rng, "any"), _size(rng, "any")]
        elif category == "counting":
            n = rng.choice(COUNTS)
            pairs = [rng.choice(pool)] * n
            sizes = [_size(rng, "any") for _ in range(n)]
        elif category == "position":
            pairs = _two_distinct_pairs(rng, pool)
            sizes = [_size(rng, "any"), _size(rng, "any")]
            relation = rng.choice(tuple(RELATIONS))
        elif category == "size":
            pairs = _two_distinct_pairs(rng, pool)
            sizes = [_size(rng, "small"), _size(rng, "large")]
        else:
            raise AssertionError(category)
        objects = _place(rng, pairs, sizes, relation)
        if objects is not None:
            return Scene(objects, category, relation)


def scene_rng(seed: int, index: int, split: str = "train") -> random.Random:
    """The generator of sample `index`: independent of how many samples are drawn, and by whom.

    A string seed is hashed with SHA-512 by `random.Random`, so it is stable across processes
    and Python runs (no PYTHONHASHSEED dependence).
    """
    return random.Random(f"mars-shapes/{split}/{seed}/{index}")


def scene_for_index(seed: int, index: int, split: str = "train", category: str | None = None) -> Scene:
    """Sample `index` of the seeded stream of scenes."""
    return sample_scene(scene_rng(seed, index, split), category, split)
