"""Procedural videos of coloured shapes and multiple-choice questions about them.

Every sample is a pure function of ``(split, index)``: the scene, the rendered frames and the
question come from one ``numpy`` generator seeded with ``[LAB_SEED, SPLIT_CODE[split], index]``,
so the train, validation and test splits are drawn from disjoint seed streams and any sample can
be regenerated alone.

A scene is a static textured background and 2-5 objects (a colour from ``COLOURS``, a shape from
``SHAPES``) with a position and a visibility flag per frame.  Objects stay still, move in straight
lines and bounce off the walls, hit another object (the hitter stops, the object that was hit moves
on), appear part-way through the video, or flash into a single frame.  Each sample belongs to one
question family (``FAMILIES``); its scene is built so that family's question has exactly one
answer.  The other families' questions are asked too when the scene defines them unambiguously
(training uses them; the test split asks one question per video, balanced over families).

Frames are ``(F, H, W, 3)`` uint8, F = 8 and H = W = 80 by default: with SigLIP patches of 4 px and
LLaVA-OneVision's 2x pooling each frame becomes 10 x 10 = 100 visual tokens of 8 x 8 px.  That is
the redundancy the paper's method exploits: the background is static (a token repeats itself in
every frame but for the sensor noise), objects are 2-3 tokens across (4-9 tokens of a frame show
one), they move by less than a token per frame, and the decisive event of a question (the collision,
the brief appearance, the first appearance) sits in one or two of the eight frames.  At 10/5/2/1 %
a frame keeps 10/5/2/1 tokens (the budgets are all different).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LAB_SEED = 20260
SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}
SPLIT_SIZE: dict[str, int] = {"val": 300, "test": 600}

FRAMES = 8
SIZE = 80
TOKEN_PX = 8  # one pooled LLaVA-OV token covers 2 x 2 SigLIP patches of 4 px
MIN_COVER = 0.1  # a token shows an object when the object covers this share of its pixels

# Four colours, four counts, four shapes: every question lists its four options in this fixed
# order, so the answer letter is a fixed function of what the video shows.  The model only has to
# find the evidence in the visual tokens, which is what token compression can take away; a model
# this small cannot also learn to bind a shuffled option list to letters on a CPU budget.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 50),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

FAMILIES: tuple[str, ...] = ("stationary", "hit", "count", "order", "rare")

QUESTIONS: dict[str, str] = {
    "stationary": "What colour is the object that stays still ?",
    "hit": "What colour is the object that was hit ?",
    "count": "How many objects appear in the video ?",
    "order_first": "Which colour appears first ?",
    "order_last": "Which colour appears last ?",
    "rare": "What colour is the object that appears only briefly ?",
    "shape": "What shape is the {colour} object ?",
}

_MAX_TRIES = 2000


@dataclass
class SceneObject:
    """One object: ``pos`` (F, 2) centre (x, y) in px, ``visible`` (F,) bool."""

    colour: str
    shape: str
    radius: float
    pos: np.ndarray
    visible: np.ndarray

    def moves(self) -> bool:
        """Whether the object changes position between two frames in which it is visible."""
        frames = np.flatnonzero(self.visible)
        if len(frames) < 2:
            return False
        p = self.pos[frames]
        return bool(np.abs(p - p[0]).max() > 0.5)


@dataclass
class Scene:
    """A background (H, W, 3) float32 and the objects drawn on it, in drawing order."""

    background: np.ndarray
    objects: list[SceneObject]
    hitter: int | None = None
    hit: int | None = None
    noise: float = 3.0


@dataclass
class Question:
    """A multiple-choice question: four ``options`` and the index of the correct one."""

    family: str
    text: str
    options: list[str]
    answer: int

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


@dataclass
class Sample:
    """One video (F, H, W, 3) uint8 with its question and every other question its scene defines."""

    split: str
    index: int
    family: str
    frames: np.ndarray
    question: Question
    extra: list[Question] = field(default_factory=list)
    scene: Scene | None = None


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.82 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base at dy = 0.8 r
        top, bottom = -r, 0.8 * r
        half = (dy - top) / (bottom - top) * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    if shape == "cross":
        w = 0.36 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def object_masks(scene: Scene, size: int = SIZE) -> np.ndarray:
    """Pixel masks of every object in every frame: (n_objects, F, H, W) bool."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = scene.objects[0].pos.shape[0] if scene.objects else FRAMES
    masks = np.zeros((len(scene.objects), frames, size, size), dtype=bool)
    for i, obj in enumerate(scene.objects):
        for t in np.flatnonzero(obj.visible):
            cx, cy = obj.pos[t]
            masks[i, t] = _shape_mask(obj.shape, xx - cx, yy - cy, obj.radius)
    return masks


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Frames of the scene: (F, H, W, 3) uint8, objects drawn over the background in order."""
    masks = object_masks(scene, scene.background.shape[0])
    frames = np.repeat(scene.background[None], masks.shape[1], axis=0)
    for obj, mask in zip(scene.objects, masks, strict=True):
        frames[mask] = np.asarray(COLOURS[obj.colour], dtype=np.float32)
    frames = frames + rng.normal(0.0, scene.noise, frames.shape).astype(np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def token_cover(scene: Scene) -> np.ndarray:
    """How much of each pooled visual token every object covers: (n_objects, F, T) in [0, 1].

    T = (H / TOKEN_PX)^2 tokens per frame in raster order, the order of LLaVA-OV's pooled features.
    """
    size = scene.background.shape[0]
    cells = size // TOKEN_PX
    masks = object_masks(scene, size)
    n, frames = masks.shape[:2]
    cover = masks.reshape(n, frames, cells, TOKEN_PX, cells, TOKEN_PX).mean(axis=(3, 5))
    return cover.reshape(n, frames, cells * cells)


def token_labels(scene: Scene, min_cover: float = MIN_COVER) -> tuple[np.ndarray, np.ndarray]:
    """Which colours and shapes each pooled visual token shows: (F, T, 4) and (F, T, 4) float.

    A token shows an object when the object covers at least ``min_cover`` of its pixels.
    """
    present = token_cover(scene) >= min_cover
    frames, tokens = present.shape[1:]
    colours = np.zeros((frames, tokens, len(COLOUR_NAMES)), dtype=np.float32)
    shapes = np.zeros((frames, tokens, len(SHAPES)), dtype=np.float32)
    for obj, here in zip(scene.objects, present, strict=True):
        colours[..., COLOUR_NAMES.index(obj.colour)] += here
        shapes[..., SHAPES.index(obj.shape)] += here
    return np.minimum(colours, 1.0), np.minimum(shapes, 1.0)


def evidence_tokens(
    scene: Scene, question: Question, shown: np.ndarray | None = None, min_cover: float = MIN_COVER
) -> np.ndarray:
    """The question's evidence: which of the N = F * T visual tokens show the object(s) its
    answer rests on, in any frame: (N,) bool.

    A token shows an object when the object covers at least ``min_cover`` of its pixels.  The
    objects: for ``count`` every object; for ``shape`` the object the question names; for the
    other families the object whose colour is the answer (the one that stays still, was hit,
    appears first or last, appears briefly).  shown: (n_objects, N) bool, precomputed.
    """
    if shown is None:
        shown = (token_cover(scene) >= min_cover).reshape(len(scene.objects), -1)
    if question.family == "count":
        return shown.any(0)
    if question.family == "shape":
        colour = next(w for w in question.text.split() if w in COLOURS)
    else:
        colour = question.options[question.answer]
    return shown[[o.colour == colour for o in scene.objects]].any(0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-contrast grey texture (stripes, checks, blotches or a gradient) with a slight tint."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
        tex = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    elif kind == 1:
        period = rng.uniform(8, 16)
        tex = np.sign(np.sin(xx * np.pi / period) * np.sin(yy * np.pi / period))
    elif kind == 2:
        coarse = rng.normal(size=(6, 6)).astype(np.float32)
        idx = np.minimum((np.arange(size) * 6) // size, 5)
        tex = coarse[idx][:, idx] / 1.5
    else:
        angle = rng.uniform(0, 2 * np.pi)
        tex = ((xx * np.cos(angle) + yy * np.sin(angle)) / size) * 2.0
    base = rng.uniform(70, 110)
    amplitude = rng.uniform(8, 16)
    tint = 1.0 + rng.uniform(-0.08, 0.08, size=3).astype(np.float32)
    grey = base + amplitude * np.clip(tex, -1.5, 1.5)
    return (grey[..., None] * tint).astype(np.float32)


# ----------------------------------------------------------------------------- motion


def _static(rng: np.random.Generator, r: float, frames: int, size: int) -> np.ndarray:
    p = rng.uniform(r + 1, size - r - 1, size=2)
    return np.repeat(p[None], frames, axis=0)


def _bouncing(rng: np.random.Generator, r: float, frames: int, size: int) -> np.ndarray:
    """Straight-line motion at 4-6.5 % of the frame size per frame, reflected at the walls."""
    p = rng.uniform(r + 1, size - r - 1, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(0.04, 0.065) * size * np.array([np.cos(angle), np.sin(angle)])
    lo, hi = r + 1, size - r - 1
    out = np.empty((frames, 2))
    for t in range(frames):
        out[t] = p
        p = p + v
        for d in range(2):
            if p[d] < lo:
                p[d], v[d] = 2 * lo - p[d], -v[d]
            elif p[d] > hi:
                p[d], v[d] = 2 * hi - p[d], -v[d]
    return out


def _new_object(
    rng: np.random.Generator, colour: str, moving: bool, frames: int, size: int
) -> SceneObject:
    r = float(rng.uniform(0.10, 0.13) * size)
    shape = SHAPES[rng.integers(len(SHAPES))]
    pos = (_bouncing if moving else _static)(rng, r, frames, size)
    return SceneObject(colour, shape, r, pos, np.ones(frames, dtype=bool))


def _collision(
    rng: np.random.Generator, colours: list[str], frames: int, size: int
) -> tuple[SceneObject, SceneObject] | None:
    """A hitter that moves into a still object at frame t_c, stops there, and sets it moving."""
    ra, rb = (float(x) for x in rng.uniform(0.10, 0.13, size=2) * size)
    speed = rng.uniform(0.045, 0.065) * size
    t_c = int(rng.integers(2, frames - 2))
    angle = rng.uniform(0, 2 * np.pi)
    u = np.array([np.cos(angle), np.sin(angle)])
    pb = rng.uniform(rb + 1, size - rb - 1, size=2)
    t = np.arange(frames)[:, None]
    contact = pb - u * (ra + rb)
    pos_a = np.where(t <= t_c, contact - u * speed * (t_c - t), contact)
    pos_b = np.where(t <= t_c, pb, pb + u * speed * (t - t_c))
    for pos, r in ((pos_a, ra), (pos_b, rb)):
        if pos.min() < r + 1 or pos.max() > size - r - 1:
            return None
    shapes = rng.choice(len(SHAPES), size=2)
    visible = np.ones(frames, dtype=bool)
    a = SceneObject(colours[0], SHAPES[shapes[0]], ra, pos_a, visible.copy())
    b = SceneObject(colours[1], SHAPES[shapes[1]], rb, pos_b, visible.copy())
    return a, b


def _separated(objects: list[SceneObject], pair: tuple[int, int] | None) -> bool:
    """No two objects overlap in a frame where both are visible (a colliding pair may touch)."""
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            both = a.visible & b.visible
            if not both.any():
                continue
            dist = np.linalg.norm(a.pos[both] - b.pos[both], axis=1)
            gap = -0.5 if pair == (i, j) else 2.0
            if dist.min() < a.radius + b.radius + gap:
                return False
    return True


# ----------------------------------------------------------------------------- scenes


def _scene_for(family: str, rng: np.random.Generator, frames: int, size: int) -> Scene:
    """A scene in which ``family``'s question has exactly one answer (rejection sampling)."""
    # drawn once, so that crowded scenes failing placement more often do not skew the answers
    n_count = int(rng.integers(1, len(COUNTS) + 1))
    for _ in range(_MAX_TRIES):
        colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))]
        objects: list[SceneObject] = []
        pair: tuple[int, int] | None = None
        if family == "stationary":
            objects.append(_new_object(rng, colours[0], False, frames, size))
            for c in colours[1 : 1 + int(rng.integers(2, 4))]:
                objects.append(_new_object(rng, c, True, frames, size))
        elif family == "hit":
            made = _collision(rng, colours, frames, size)
            if made is None:
                continue
            objects.extend(made)
            pair = (0, 1)
            objects.append(_new_object(rng, colours[2], bool(rng.integers(2)), frames, size))
        elif family == "count":
            for c in colours[:n_count]:
                objects.append(_new_object(rng, c, bool(rng.integers(2)), frames, size))
        elif family == "order":
            start = int(rng.integers(0, 3))
            steps = rng.integers(1, 3, size=2)
            appear = [start, start + int(steps[0]), start + int(steps[0] + steps[1])]
            for c, t0 in zip(colours[:3], appear, strict=True):
                obj = _new_object(rng, c, bool(rng.integers(2)), frames, size)
                obj.visible[:t0] = False
                objects.append(obj)
        elif family == "rare":
            for c in colours[: int(rng.integers(2, 4))]:
                objects.append(_new_object(rng, c, bool(rng.integers(2)), frames, size))
            flash = _new_object(rng, colours[len(objects)], False, frames, size)
            flash.visible[:] = False
            flash.visible[int(rng.integers(1, frames - 1))] = True
            objects.append(flash)
        elif family == "shape":
            for c in colours[: int(rng.integers(2, 4))]:
                objects.append(_new_object(rng, c, bool(rng.integers(2)), frames, size))
        else:
            raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
        if not _separated(objects, pair):
            continue
        order = rng.permutation(len(objects))  # drawing order carries no information
        objects = [objects[i] for i in order]
        where = {int(old): new for new, old in enumerate(order)}
        scene = Scene(_background(rng, size), objects)
        if pair is not None:
            scene.hitter, scene.hit = where[0], where[1]
        return scene
    raise RuntimeError(f"could not place a {family!r} scene in {_MAX_TRIES} tries")


# ----------------------------------------------------------------------------- questions


def _colour_options(rng: np.random.Generator, scene: Scene, answer: str) -> tuple[list[str], int]:
    """The four colours in their fixed order, and the answer's index."""
    return list(COLOUR_NAMES), COLOUR_NAMES.index(answer)


def _ask(rng: np.random.Generator, scene: Scene, family: str, variant: str = "") -> Question | None:
    """The question of ``family`` about ``scene``, or None when the scene leaves it ambiguous."""
    objs = scene.objects
    shown = [int(o.visible.sum()) for o in objs]
    if family == "stationary":
        still = [i for i, o in enumerate(objs) if shown[i] >= 2 and not o.moves()]
        if len(still) != 1 or not any(o.moves() for o in objs) or scene.hitter is not None:
            return None
        answer = objs[still[0]].colour
    elif family == "hit":
        if scene.hit is None:
            return None
        answer = objs[scene.hit].colour
    elif family == "count":
        n = str(len(objs))
        if n not in COUNTS:
            return None
        return Question("count", QUESTIONS["count"], list(COUNTS), COUNTS.index(n))
    elif family == "order":
        first = np.array([int(np.flatnonzero(o.visible)[0]) for o in objs])
        variant = variant or ("first" if rng.integers(2) == 0 else "last")
        key = first if variant == "first" else -first
        ranked = np.sort(key)
        if len(objs) < 2 or ranked[0] == ranked[1] or first.min() == first.max():
            return None
        answer = objs[int(np.argmin(key))].colour
        options, idx = _colour_options(rng, scene, answer)
        return Question("order", QUESTIONS[f"order_{variant}"], options, idx)
    elif family == "rare":
        brief = [i for i, s in enumerate(shown) if s <= 2]
        if len(brief) != 1 or min(s for i, s in enumerate(shown) if i != brief[0]) < 4:
            return None
        answer = objs[brief[0]].colour
    elif family == "shape":
        candidates = [i for i, s in enumerate(shown) if s >= 3]
        if not candidates:
            return None
        obj = objs[candidates[int(rng.integers(len(candidates)))]]
        text = QUESTIONS["shape"].format(colour=obj.colour)
        return Question("shape", text, list(SHAPES), SHAPES.index(obj.shape))
    else:
        raise ValueError(f"unknown family {family!r}; known families: {', '.join(FAMILIES)}")
    options, idx = _colour_options(rng, scene, answer)
    return Question(family, QUESTIONS[family], options, idx)


# ----------------------------------------------------------------------------- samples


def family_of(index: int) -> str:
    """Families cycle with the index, so every split is balanced."""
    return FAMILIES[index % len(FAMILIES)]


def make_sample(
    split: str, index: int, frames: int = FRAMES, size: int = SIZE, keep_scene: bool = False
) -> Sample:
    """Sample ``index`` of ``split``: a deterministic function of ``(split, index)``."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CODE)}, got {split!r}")
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    if frames < 6 or size < 48 or size % TOKEN_PX:
        raise ValueError(
            f"need frames >= 6 and size a multiple of {TOKEN_PX} >= 48, got {frames}, {size}"
        )
    rng = np.random.default_rng([LAB_SEED, SPLIT_CODE[split], index])
    family = family_of(index)
    scene = _scene_for(family, rng, frames, size)
    question = _ask(rng, scene, family)
    if question is None:  # the scene builders guarantee their own family's question
        raise RuntimeError(f"{family} scene {split}/{index} has no unambiguous answer")
    extra = [q for f in FAMILIES if f != family and (q := _ask(rng, scene, f)) is not None]
    video = render(scene, rng)
    return Sample(split, index, family, video, question, extra, scene if keep_scene else None)


def split_size(split: str) -> int | None:
    """Default number of samples of a split (None for the unbounded training stream)."""
    if split not in SPLIT_CODE:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CODE)}, got {split!r}")
    return SPLIT_SIZE.get(split)
