"""Images of coloured shapes with exact ground truth, deterministic from a seed."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
OBJECTS = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
BACKGROUND = (245, 245, 245)
CAPTION_QUESTION = "Describe the image."


@dataclass(frozen=True)
class Placed:
    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: objects left to right."""

    objects: tuple[Placed, ...]
    image_size: int = 64

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            _draw(draw, o, COLOURS[o.colour])
        return image

    def object_map(self) -> Image.Image:
        """Per pixel, 1 + the index in OBJECTS of the object drawn there (0: background); same geometry as render."""
        image = Image.new("L", (self.image_size, self.image_size), 0)
        draw = ImageDraw.Draw(image)
        for o in self.objects:
            _draw(draw, o, 1 + OBJECTS.index(o.name))
        return image

    def patch_labels(self, patch: int, min_cover: float = 0.0) -> list[int]:
        """Per patch (row-major, as a ViT orders them), 1 + the index in OBJECTS of the object it shows (0: background).

        `min_cover` 0: the label covering most of the patch's pixels, background included. Above 0: the object
        covering most of the patch's object pixels when it covers at least that share of the patch, else
        background. Large patches need the second rule: a 16 px object straddling four 16 px patches covers a
        minority of each, and the first rule would leave it without a patch.
        """
        pixels = self.object_map().load()
        labels = []
        for top in range(0, self.image_size, patch):
            for left in range(0, self.image_size, patch):
                counts: dict[int, int] = {}
                for y in range(top, top + patch):
                    for x in range(left, left + patch):
                        value = int(pixels[x, y])
                        counts[value] = counts.get(value, 0) + 1
                if min_cover > 0:
                    objects = {k: v for k, v in counts.items() if k}
                    best = max(objects, key=lambda k: (objects[k], -k)) if objects else 0
                    labels.append(best if best and objects[best] >= min_cover * patch * patch else 0)
                else:
                    labels.append(max(counts, key=lambda k: (counts[k], -k)))
        return labels


def _draw(draw: ImageDraw.ImageDraw, o: Placed, fill: tuple[int, int, int] | int) -> None:
    half = o.size // 2
    if o.shape == "circle":
        draw.ellipse([o.x - half, o.y - half, o.x + half, o.y + half], fill=fill)
    elif o.shape == "square":
        draw.rectangle([o.x - half, o.y - half, o.x + half, o.y + half], fill=fill)
    else:
        h = int(o.size * math.sqrt(3) / 2)
        draw.polygon([(o.x, o.y - h // 2), (o.x - half, o.y + h // 2), (o.x + half, o.y + h // 2)], fill=fill)


def random_scene(rng: random.Random, *, image_size: int = 64, max_objects: int = 3) -> Scene:
    """1..max_objects distinct objects, 16-24 px, not overlapping, sorted left to right."""
    count = rng.randint(1, max_objects)
    names = rng.sample(OBJECTS, count)
    placed: list[Placed] = []
    for name in names:
        colour, shape = name.split()
        for _ in range(200):
            size = rng.randint(16, 24)
            x = rng.randint(size // 2 + 1, image_size - size // 2 - 2)
            y = rng.randint(size // 2 + 1, image_size - size // 2 - 2)
            if all(abs(x - p.x) > (size + p.size) // 2 + 1 or abs(y - p.y) > (size + p.size) // 2 + 1 for p in placed):
                placed.append(Placed(colour, shape, x, y, size))
                break
    placed.sort(key=lambda p: p.x)
    return Scene(tuple(placed), image_size)


def scenes(seed: int, count: int, *, image_size: int = 64, max_objects: int = 3) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng, image_size=image_size, max_objects=max_objects) for _ in range(count)]


def caption(names: list[str]) -> str:
    """'a red circle, a blue square and a green triangle.'"""
    items = [f"a {n}" for n in names]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text + "."


def noisy_caption(scene: Scene, rng: random.Random, hallucination_rate: float) -> str:
    """The true caption, or (with probability `hallucination_rate`) one with an absent object inserted."""
    names = scene.names
    if rng.random() < hallucination_rate:
        absent = [o for o in OBJECTS if o not in names]
        names = list(names)
        names.insert(rng.randint(0, len(names)), rng.choice(absent))
    return caption(names)


def yes_no_question(obj: str) -> str:
    """The same wording the claim verifier asks (reward.claims.RuleQuestionWriter)."""
    return f"Is there a {obj} in the image? Please answer yes or no."


def sample_yes_no(scene: Scene, rng: random.Random, near_miss: float = 0.6) -> tuple[str, str, bool]:
    """A yes/no question about the scene; half are 'no', most of those near misses (shared colour or shape)."""
    names = scene.names
    if rng.random() < 0.5:
        obj = rng.choice(names)
        return yes_no_question(obj), "yes", True
    absent = [o for o in OBJECTS if o not in names]
    near = [o for o in absent if any(o.split()[0] == n.split()[0] or o.split()[1] == n.split()[1] for n in names)]
    pool = near if near and rng.random() < near_miss else absent
    obj = rng.choice(pool)
    return yes_no_question(obj), "no", False


def sample_training_yes_no(
    scene: Scene, rng: random.Random, colour_miss: float = 0.5, shape_miss: float = 0.25
) -> tuple[str, str, bool]:
    """A yes/no question for SFT: half 'no', most of those about an absent object sharing a present one's colour.

    Same-colour misses ("a red square" when only a red circle is there) are the
    ones a model answering from colour alone gets wrong; with the evaluation's
    mix (`sample_yes_no`) they are 15 % of the questions, colour alone scores
    85 %, and training often settles there (yes/no F1 0.84). At half the "no"
    questions they force shape and colour to be bound.
    """
    names = scene.names
    if rng.random() < 0.5:
        return yes_no_question(rng.choice(names)), "yes", True
    absent = [o for o in OBJECTS if o not in names]
    colour = [o for o in absent if any(o.split()[0] == n.split()[0] for n in names)]
    shape = [o for o in absent if any(o.split()[1] == n.split()[1] for n in names)]
    draw = rng.random()
    if draw < colour_miss and colour:
        pool = colour
    elif colour_miss <= draw < colour_miss + shape_miss and shape:
        pool = shape
    else:
        pool = absent
    return yes_no_question(rng.choice(pool)), "no", False


def question_kinds(scene: Scene) -> dict[str, list[str]]:
    """The objects a yes/no question can name, by kind: present ones, and absent ones sharing a present object's
    colour, sharing only a shape, or sharing neither (disjoint). Same-colour misses are what a judge answering
    from colour alone gets wrong."""
    names = scene.names
    absent = [o for o in OBJECTS if o not in names]
    colour = [o for o in absent if any(o.split()[0] == n.split()[0] for n in names)]
    shape = [o for o in absent if o not in colour and any(o.split()[1] == n.split()[1] for n in names)]
    other = [o for o in absent if o not in colour and o not in shape]
    return {"present": names, "colour_miss": colour, "shape_miss": shape, "other_miss": other}


def vocabulary() -> tuple[str, ...]:
    words = {"a", "and", "describe", "the", "image", "is", "there", "in", "yes", "no", "please", "answer", "or"}
    words.update(COLOURS)
    words.update(SHAPES)
    return tuple(sorted(words))


def well_formed(text: str) -> bool:
    """The caption is the world's own caption of the objects it names: no repeated or stray words, no broken
    phrases (what a sample at temperature 1 sometimes is, and where a DPO log-ratio is least reliable)."""
    names = extract_objects(text)
    return bool(names) and text.strip() == caption(names)


def extract_objects(text: str) -> list[str]:
    """Object mentions ('colour shape') in order; the shapes world's object extractor for CHAIR."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    return [f"{a} {b}" for a, b in itertools.pairwise(words) if a in COLOURS and b in SHAPES]
