"""Counterfactual scenes: the same two objects with one stated fact made false.

A scene of `two`, `position` or `size` states facts its canonical caption names: which colour goes
with which shape (binding), where A stands relative to B (relation), which object is the small one
(size). `falsify(scene, fact)` returns the scene with exactly that fact made false and everything
else kept, so that its picture fails the caption for that one reason (SHAPES_SPEC's checker says
which):

- binding: A and B exchange colours, shapes and places kept ("a red circle and a blue square" ->
  a blue circle and a red square). Needs two colours and two shapes: with one of them shared the
  exchange changes nothing a caption states.
- relation (position scenes): both centres mirrored across the canvas along the relation's axis,
  so "A left of B" becomes "A right of B" by as many pixels; shapes keep their orientation.
- size (size scenes): A and B exchange sizes, centres kept, so the small object becomes the large
  one; a scene whose exchanged objects would leave the canvas or touch is not falsifiable.

A render of the scene and of its counterfactual is a preference pair that differs in that fact
alone (`mars preferences --counterfactual FACT`): no sampling, no judge, and no other difference
for a preference stage to learn instead (a pair of the model's own images usually also differs in
how many objects it shows).

`falsify_prompt(parsed, fact)` does the same to what a canonical prompt asks: the prompt whose
images are exactly the counterfactual scenes' ("A left of B" -> "A right of B"; the colours
exchanged; small and large exchanged). SHAPES_SPEC's checker accepting an image for it means the
image is wrong in that one fact and right in every other (`mars preferences --judge checker
--mirror FACT` uses it to find such images among the model's own).
"""

from __future__ import annotations

import dataclasses

from mars.data.captions import ParsedPrompt
from mars.data.shapes import CANVAS, INVERSE_RELATION, RELATIONS, Scene, ShapeObject, boxes_apart, fits_canvas
from mars.errors import MarsError

FACT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "binding": ("two", "position", "size"),
    "relation": ("position",),
    "size": ("size",),
}
FACTS: tuple[str, ...] = tuple(FACT_CATEGORIES)


def check_fact(fact: str, categories: tuple[str, ...]) -> None:
    """Refuse an unknown fact, or categories whose captions do not state it."""
    if fact not in FACT_CATEGORIES:
        raise MarsError(f"unknown counterfactual {fact!r}; choose from {', '.join(FACTS)}")
    outside = sorted(set(categories) - set(FACT_CATEGORIES[fact]))
    if outside:
        raise MarsError(f"the {fact} counterfactual needs scenes whose captions state a {fact} "
                        f"({', '.join(FACT_CATEGORIES[fact])}); not {', '.join(outside)}")


def falsify(scene: Scene, fact: str) -> Scene | None:
    """`scene` with `fact` made false (module docstring), or None when this scene cannot be."""
    check_fact(fact, (scene.category,))
    a, b = scene.objects
    if fact == "binding":
        if not _colours_exchangeable((a.colour, a.shape), (b.colour, b.shape)):
            return None
        changed = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    elif fact == "relation":
        axis = RELATIONS[scene.relation][0]
        changed = tuple(_mirrored(o, axis) for o in (a, b))
    else:
        changed = (dataclasses.replace(a, size=b.size), dataclasses.replace(b, size=a.size))
        if not (all(fits_canvas(o) for o in changed) and boxes_apart(*changed)):
            return None
    return Scene(changed, scene.category, scene.relation)


def falsify_prompt(parsed: ParsedPrompt, fact: str) -> ParsedPrompt | None:
    """What `parsed` asks with `fact` made false (module docstring), or None when the fact cannot be
    (binding with a colour or a shape shared, as for `falsify`)."""
    check_fact(fact, (parsed.category,))
    (colour_a, shape_a), (colour_b, shape_b) = parsed.objects
    if fact == "binding":
        if not _colours_exchangeable(*parsed.objects):
            return None
        return dataclasses.replace(parsed, objects=((colour_b, shape_a), (colour_a, shape_b)))
    if fact == "relation":
        return dataclasses.replace(parsed, relation=INVERSE_RELATION[parsed.relation])
    return dataclasses.replace(parsed, objects=parsed.objects[::-1])


def _colours_exchangeable(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether exchanging the colours of two (colour, shape) objects changes what a caption states:
    only when they differ in both."""
    return a[0] != b[0] and a[1] != b[1]


def _mirrored(obj: ShapeObject, axis: int) -> ShapeObject:
    """The object reflected across the canvas's middle line along `axis` (0 = x, 1 = y)."""
    if axis == 0:
        return dataclasses.replace(obj, cx=CANVAS - 1 - obj.cx)
    return dataclasses.replace(obj, cy=CANVAS - 1 - obj.cy)

