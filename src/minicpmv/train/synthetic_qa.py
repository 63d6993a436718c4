"""Training questions and answers for the demo model, and its fine-tuning splits.

``ask(family, scenes, rng)`` phrases one question of a family about one or two scenes
(``synthetic.Scene``) and gives its exact answer; families cover colour, shape, position
(3x3, left/right, top/bottom), counts (all, per shape, per colour), existence, attribute binding
("What colour is the square?", "Is the circle left of the star?"), size comparisons, reading,
descriptions, two-image comparisons, out-of-world questions (``REFUSAL``) and questions that
do not fit the picture ("I see no text."). Phrasings vary (templates, synonyms, prefixes,
suffixes, case) so that the model keys on content words. ``conversation`` strings 1-4 questions
into one multi-turn chat with follow-ups ("Where is it?", "And the star?"); ``write_split``
writes records in the official fine-tuning format. Pictures are drawn by ``synthetic.py``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

from .demo_world import (
    ALPHABET,
    MAX_OBJECTS,
    NO_IMAGE,
    NO_SHAPES,
    NO_TEXT,
    REFUSAL,
    describe_shapes,
    describe_text,
    image_answer,
    position_name,
)
from .synthetic import STAGE2_OTHER_STYLES, Obj, Scene, make_scene, render

QA = tuple[str, str]

T = {
    "colour": ["What colour is the shape?", "What color is the shape?", "What colour is it?", "Which colour is the "
               "object?", "What is the colour of the shape?", "What color do you see?", "Tell me the colour of the "
               "shape.", "Which color is the shape in the picture?"],
    "shape": ["What shape is this?", "What shape is it?", "Which shape do you see?", "Name the shape.",
              "What kind of shape is in the picture?", "What is the shape?", "What shape is in the image?"],
    "position": ["Where is the shape?", "Where is it?", "In which part of the image is the shape?",
                 "Where is the object located?", "Where is the shape in the picture?", "Where can you see the shape?"],
    "lr": ["Is the shape on the left or the right?", "Is it on the left or right side?",
           "Left or right: where is the shape?"],
    "tb": ["Is the shape at the top or the bottom?", "Is it near the top or the bottom?",
           "Top or bottom: where is the shape?"],
    "count": ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes.",
              "How many objects do you see?", "How many things are in the picture?", "What is the number of shapes?"],
    "count_shape": ["How many {s}s are there?", "How many {s}s do you see?", "Count the {s}s.",
                    "How many {s}s are in the picture?", "What is the number of {s}s?"],
    "count_colour": ["How many {c} shapes are there?", "How many shapes are {c}?", "Count the {c} shapes.",
                     "How many {c} objects do you see?"],
    "exists": ["Is there a {r}?", "Do you see a {r}?", "Is there any {r} in the picture?", "Can you see a {r}?"],
    "colour_of": ["What colour is the {r}?", "What color is the {r}?", "Which colour does the {r} have?",
                  "What is the colour of the {r}?", "Tell me the color of the {r}."],
    "shape_of": ["What shape is the {c} one?", "Which shape is {c}?", "What is the {c} shape?",
                 "What kind of shape is the {c} one?"],
    "where_of": ["Where is the {r}?", "Where is the {r} in the picture?", "In which part of the image is the {r}?"],
    "rel_x": ["Is the {a} left of the {b}?", "Is the {a} to the left of the {b}?", "Is the {a} right of the {b}?",
              "Is the {a} to the right of the {b}?"],
    "rel_y": ["Is the {a} above the {b}?", "Is the {a} below the {b}?", "Is the {a} higher than the {b}?",
              "Is the {a} lower than the {b}?"],
    "which_x": ["Which is further left, the {a} or the {b}?", "Which is further right, the {a} or the {b}?"],
    "bigger": ["Which is bigger, the {a} or the {b}?", "Which is larger, the {a} or the {b}?",
               "Which is smaller, the {a} or the {b}?"],
    "is_bigger": ["Is the {a} bigger than the {b}?", "Is the {a} larger than the {b}?",
                  "Is the {a} smaller than the {b}?"],
    "extreme": ["Which shape is the biggest?", "What is the largest shape?", "What colour is the biggest shape?",
                "Which shape is the smallest?", "What colour is the smallest shape?"],
    "describe": ["What is in this image?", "What do you see?", "Describe the image.", "What is this?",
                 "What is in the picture?"],
    "reading": ["What does the text say?", "What is written in the image?", "Read the text.",
                "What word is written here?", "What is written here?", "What does it say?",
                "Read the text in the image.", "What text do you see?", "What are the letters in the picture?"],
    "oow": ["Who is this?", "What animal is this?", "What is the weather like?", "How old is this person?",
            "What is the name of this place?", "Is this a cat or a dog?", "What brand is this?", "What time is it?",
            "Why is it here?", "What emotion does this show?", "Where was this photo taken?",
            "What is the capital of France?", "Tell me a joke.", "What is happening here?", "What is the man doing?",
            "Is this food healthy?", "What car is this?", "Write a poem about this.", "What season is it?",
            "How much does it cost?", "Which country is this?", "What sport is this?", "Is it day or night?",
            "What is the mood of this picture?", "Who painted this?", "What is the dog doing?"],
    "more": ["Which image has more shapes?", "Which picture has more shapes?", "Which image has fewer shapes?",
             "Which picture has fewer objects?"],
    "per_image": ["What colour is the shape in the {o} image?", "How many shapes are in the {o} image?",
                  "What shape is in the {o} picture?"],
}
PREFIXES = ("", "", "", "", "Please tell me: ", "Hey, ", "Question: ", "Can you tell me this: ",
            "Look at the picture. ")
SUFFIXES = ("", "", "", "", " Answer briefly.", " Thanks!", " Please answer.", " One word please.")
SYNONYMS = (("colour", "color"), ("image", "picture"), ("picture", "drawing"), ("shapes", "objects"))
IN_WORLD_SHAPE_FAMILIES = ("colour", "shape", "position", "lr", "tb", "count", "count_shape", "count_colour",
                           "exists", "colour_of", "shape_of", "where_of", "rel_x", "rel_y", "which_x", "bigger",
                           "is_bigger", "extreme", "describe")


def vary(q: str, rng: random.Random) -> str:
    """A random rephrasing that keeps the content words: synonyms, prefix, suffix, case."""
    for a, b in SYNONYMS:
        if a in q and rng.random() < 0.25:
            q = q.replace(a, b)
    prefix, suffix = rng.choice(PREFIXES), rng.choice(SUFFIXES)
    if prefix:
        q = prefix + q[0].lower() + q[1:]
    q += suffix
    if rng.random() < 0.1:
        q = q.lower()
    if rng.random() < 0.1:
        q = q.rstrip("?")
    return q


def _ref(scene: Scene, o: Obj, rng: random.Random) -> str | None:
    """How to name ``o`` uniquely: by shape, by colour or by both (None if none is unique)."""
    by_shape = sum(p.shape == o.shape for p in scene.objects) == 1
    by_colour = sum(p.colour == o.colour for p in scene.objects) == 1
    both = sum(p.shape == o.shape and p.colour == o.colour for p in scene.objects) == 1
    options = ([o.shape] if by_shape else []) + ([f"{o.colour} shape"] if by_colour else []) + (
        [f"{o.colour} {o.shape}"] if both else [])
    return rng.choice(options) if options else None


def _pick_ref(scene: Scene, rng: random.Random) -> tuple[Obj, str] | None:
    refs = [(o, r) for o in scene.objects if (r := _ref(scene, o, rng)) is not None]
    return rng.choice(refs) if refs else None


def _pick_pair(scene: Scene, rng: random.Random) -> tuple[tuple[Obj, str], tuple[Obj, str]] | None:
    refs = [(o, r) for o in scene.objects if (r := _ref(scene, o, rng)) is not None]
    return tuple(rng.sample(refs, 2)) if len(refs) >= 2 else None  # type: ignore[return-value]


def _fx(scene: Scene, o: Obj) -> tuple[float, float]:
    return o.cx / scene.width, o.cy / scene.height


def _single(scene: Scene, fam: str, rng: random.Random) -> QA | None:
    o = scene.objects[0]
    fx, fy = _fx(scene, o)
    q = rng.choice(T[fam])
    if fam == "colour":
        return q, o.colour
    if fam == "shape":
        return q, o.shape
    if fam == "position":
        return q, position_name(fx, fy)
    if fam == "lr" and abs(fx - 0.5) > 0.08:
        return q, "left" if fx < 0.5 else "right"
    if fam == "tb" and abs(fy - 0.5) > 0.08:
        return q, "top" if fy < 0.5 else "bottom"
    return None


def _counts(scene: Scene, fam: str, rng: random.Random) -> QA | None:
    objs = scene.objects
    if fam == "count":
        return rng.choice(T[fam]), str(len(objs))
    if fam == "count_shape":
        s = rng.choice([o.shape for o in objs]) if objs and rng.random() < 0.85 else rng.choice(
            ("circle", "square", "rectangle", "triangle", "diamond", "star"))
        return rng.choice(T[fam]).format(s=s), str(sum(o.shape == s for o in objs))
    if fam == "count_colour":
        c = rng.choice([o.colour for o in objs]) if objs and rng.random() < 0.85 else rng.choice(
            ("red", "blue", "green", "yellow"))
        return rng.choice(T[fam]).format(c=c), str(sum(o.colour == c for o in objs))
    if fam == "exists":
        if rng.random() < 0.5:
            s = rng.choice(("circle", "square", "rectangle", "triangle", "diamond", "star"))
            return rng.choice(T[fam]).format(r=s), "yes" if any(o.shape == s for o in objs) else "no"
        c = rng.choice(("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black"))
        return rng.choice(T[fam]).format(r=f"{c} shape"), "yes" if any(o.colour == c for o in objs) else "no"
    return None


def _binding(scene: Scene, fam: str, rng: random.Random) -> tuple[QA, Obj] | None:
    picked = _pick_ref(scene, rng)
    if picked is None:
        return None
    o, ref = picked
    if fam == "colour_of" and ref == o.shape:
        return (rng.choice(T[fam]).format(r=ref), o.colour), o
    if fam == "shape_of" and ref == f"{o.colour} shape":
        return (rng.choice(T[fam]).format(c=o.colour), o.shape), o
    if fam == "where_of":
        return (rng.choice(T[fam]).format(r=ref), position_name(*_fx(scene, o))), o
    return None


def _relations(scene: Scene, fam: str, rng: random.Random) -> QA | None:
    pair = _pick_pair(scene, rng)
    if pair is None:
        return None
    (a, ra), (b, rb) = pair
    q = rng.choice(T[fam]).format(a=ra, b=rb)
    (ax, ay), (bx, by) = _fx(scene, a), _fx(scene, b)
    if fam in ("rel_x", "which_x") and abs(ax - bx) > 0.06:
        left = ax < bx
        if fam == "which_x":
            return q, ra if ("left" in q) == left else rb
        return q, "yes" if ("left" in q) == left else "no"
    if fam == "rel_y" and abs(ay - by) > 0.06:
        above = ay < by
        return q, "yes" if (("above" in q) or ("higher" in q)) == above else "no"
    sa, sb = scene.size_of(a), scene.size_of(b)
    if fam in ("bigger", "is_bigger") and max(sa, sb) / min(sa, sb) >= 1.3:
        bigger = sa > sb
        small_q = "smaller" in q
        if fam == "bigger":
            return q, ra if bigger != small_q else rb
        return q, "yes" if bigger != small_q else "no"
    return None


def _extreme(scene: Scene, rng: random.Random) -> QA | None:
    objs = sorted(scene.objects, key=scene.size_of)
    if len(objs) < 2:
        return None
    q = rng.choice(T["extreme"])
    big = "big" in q or "largest" in q
    o, runner = (objs[-1], objs[-2]) if big else (objs[0], objs[1])
    ratio = scene.size_of(o) / scene.size_of(runner)
    if max(ratio, 1 / ratio) < 1.3:
        return None
    return q, o.colour if "colour" in q else o.shape


_OFF_NOUNS = ("person", "man", "woman", "child", "dog", "cat", "bird", "horse", "animal", "car", "bus", "train",
              "plane", "boat", "building", "house", "bridge", "tower", "street", "town", "city", "country",
              "mountain", "river", "lake", "beach", "forest", "flower", "tree", "garden", "food", "dish", "drink",
              "fruit", "painting", "photo", "drawing", "logo", "brand", "movie", "song", "book", "game", "team",
              "player", "artist", "painter", "photographer", "room", "kitchen", "church", "school", "shop", "face")
_OFF_ASPECTS = ("name", "age", "price", "history", "meaning", "story", "weather", "temperature", "mood", "style",
                "owner", "address", "value", "purpose", "origin", "language", "species", "model", "author")
_OFF_VERBS = ("made", "drew", "painted", "took", "designed", "built", "owns", "wrote", "sent", "created")
_OFF_PARTICIPLES = ("taken", "made", "drawn", "painted", "built", "photographed", "created", "found", "bought")
_OFF_ADJECTIVES = ("old", "big", "tall", "far", "expensive", "heavy", "fast", "famous", "dangerous", "happy", "real")
_OFF_TEMPLATES = ("Who {v} this {n}?", "What kind of {n} is this?", "What type of {n} is it?", "Which {n} is this?",
                  "Where was this {p}?", "Where is this {n}?", "When was this {n} {p}?", "What is the {a} of this {n}?",
                  "What is the {n}'s {a}?", "How {j} is the {n}?", "Is the {n} {j}?", "What is the {n} doing?",
                  "Why is the {n} here?", "How many {n}s are there?", "Can you name the {n}?", "Tell me about the {n}.",
                  "Who is the {n} in this picture?", "What {n} is shown here?", "Is this {n} {j}?",
                  "Do you know this {n}?", "What does the {n} think?", "Where does the {n} live?")


def off_world_question(rng: random.Random) -> str:
    """A question about something outside the demo model's world, composed from open word lists (many
    of whose words the tokenizer spells in bytes, as it does most words a user may type)."""
    return rng.choice(_OFF_TEMPLATES).format(n=rng.choice(_OFF_NOUNS), a=rng.choice(_OFF_ASPECTS),
                                             v=rng.choice(_OFF_VERBS), p=rng.choice(_OFF_PARTICIPLES),
                                             j=rng.choice(_OFF_ADJECTIVES))


def _oow(rng: random.Random, open_world: bool) -> QA:
    """An out-of-world question: from ``T["oow"]``, or half the time (``open_world``) composed."""
    if open_world and rng.random() >= 0.5:
        return off_world_question(rng), REFUSAL
    return rng.choice(T["oow"]), REFUSAL


def ask_shapes(scene: Scene, fam: str, rng: random.Random, open_world: bool = False
               ) -> tuple[QA, Obj | None] | None:
    """A question of ``fam`` about a shapes scene, and the object it is about (for follow-ups)."""
    n = len(scene.objects)
    if fam in ("colour", "shape", "position", "lr", "tb"):
        return ((qa, scene.objects[0]) if (qa := _single(scene, fam, rng)) else None) if n == 1 else None
    if fam in ("count", "count_shape", "count_colour", "exists"):
        return ((qa, None) if (qa := _counts(scene, fam, rng)) else None)
    if fam in ("colour_of", "shape_of", "where_of"):
        return _binding(scene, fam, rng)
    if fam in ("rel_x", "rel_y", "which_x", "bigger", "is_bigger"):
        return ((qa, None) if (qa := _relations(scene, fam, rng)) else None)
    if fam == "extreme":
        return ((qa, None) if (qa := _extreme(scene, rng)) else None)
    if fam == "describe":
        return (rng.choice(T[fam]), describe_shapes([(o.colour, o.shape) for o in scene.objects])), None
    if fam == "reading":
        return (rng.choice(T[fam]), NO_TEXT), None
    if fam == "oow":
        return _oow(rng, open_world), None
    return None


def ask_text(scene: Scene, fam: str, rng: random.Random, open_world: bool = False) -> QA | None:
    if fam == "reading":
        return rng.choice(T[fam]), scene.lines[0]
    if fam == "describe":
        return rng.choice(T[fam]), describe_text(scene.lines[0])
    if fam in ("count", "count_shape", "count_colour", "exists"):
        qa = _counts(scene, fam, rng)
        return qa
    if fam == "oow":
        return _oow(rng, open_world)
    if fam in T and fam not in ("more", "per_image"):
        q = rng.choice(T[fam])
        return (q.format(r="circle", s="circle", c="red", a="circle", b="star"), NO_SHAPES)
    return None


def follow_up(scene: Scene, focus: Obj, rng: random.Random) -> QA | None:
    """A question about the object the previous turn was about, without naming it."""
    kind = rng.choice(("where", "colour", "shape", "other"))
    if kind == "where":
        return rng.choice(("Where is it?", "And where is it?", "Where is that one?")), position_name(*_fx(scene, focus))
    if kind == "colour":
        return rng.choice(("What colour is it?", "And its colour?", "What color is that one?")), focus.colour
    if kind == "shape":
        return rng.choice(("What shape is it?", "And its shape?", "Which shape is that one?")), focus.shape
    others = [o for o in scene.objects if o is not focus and o.shape != focus.shape
              and sum(p.shape == o.shape for p in scene.objects) == 1]
    if not others:
        return None
    o = rng.choice(others)
    return rng.choice(("And the {s}?", "What about the {s}?")).format(s=o.shape), o.colour


SHAPE_FAMILY_WEIGHTS = {"colour": 3, "shape": 3, "position": 3, "lr": 1, "tb": 1, "count": 3, "count_shape": 2,
                        "count_colour": 2, "exists": 1, "colour_of": 3, "shape_of": 2, "where_of": 3, "rel_x": 2,
                        "rel_y": 2, "which_x": 1, "bigger": 1.5, "is_bigger": 1.5, "extreme": 1.5, "describe": 1,
                        "reading": 0.7, "oow": 1}
TEXT_FAMILY_WEIGHTS = {"reading": 10, "describe": 1, "count": 0.5, "colour": 0.5, "shape": 0.5, "position": 0.3,
                       "colour_of": 0.3, "oow": 0.7}


def _shape_turns(scene: Scene, rng: random.Random, n: int, open_world: bool) -> list[QA]:
    turns: list[QA] = []
    focus: Obj | None = None
    fams, weights = list(SHAPE_FAMILY_WEIGHTS), list(SHAPE_FAMILY_WEIGHTS.values())
    for _ in range(n * 4):
        if len(turns) == n:
            break
        if focus is not None and rng.random() < 0.5 and (qa := follow_up(scene, focus, rng)):
            turns.append(qa)
            focus = None
            continue
        got = ask_shapes(scene, rng.choices(fams, weights=weights)[0], rng, open_world)
        if got is not None:
            turns.append(got[0])
            focus = got[1] if len(scene.objects) > 1 else None
    return turns


def scene_turns(scene: Scene, rng: random.Random, n: int, open_world: bool = False) -> list[QA]:
    """``n`` question/answer turns about one scene (fewer if the scene allows fewer); with
    ``open_world``, composed out-of-world questions too (``off_world_question``)."""
    if scene.kind == "shapes":
        return _shape_turns(scene, rng, n, open_world)
    if scene.kind == "other":
        fams = [*IN_WORLD_SHAPE_FAMILIES, "reading", "oow", "describe", "describe"]
        out = []
        for _ in range(n):
            fam = rng.choice(fams)
            got = ask_shapes(make_scene(random.Random(rng.random()), "shapes", n_objects=2), fam, rng, open_world)
            if fam == "oow" and open_world:  # a second draw (the first is unused): the bundled
                out.append(_oow(rng, open_world))  # model's training data were made so
            else:
                out.append((got[0][0] if got else rng.choice(T["describe"]), REFUSAL))
        return out
    fams, weights = list(TEXT_FAMILY_WEIGHTS), list(TEXT_FAMILY_WEIGHTS.values())
    turns = []
    for _ in range(n * 3):
        if len(turns) == n:
            break
        qa = ask_text(scene, rng.choices(fams, weights=weights)[0], rng, open_world)
        if qa is not None and qa not in turns:
            turns.append(qa)
    return turns


def two_image_turn(a: Scene, b: Scene, rng: random.Random) -> QA | None:
    fam = rng.choice(("more", "per_image"))
    if fam == "more":
        na, nb = len(a.objects), len(b.objects)
        if na == nb:
            return None
        q = rng.choice(T["more"])
        more = na > nb
        return q, image_answer(0 if more != ("fewer" in q) else 1)
    idx = rng.randrange(2)
    s = (a, b)[idx]
    q = rng.choice(T["per_image"]).format(o=("first", "second")[idx])
    if "How many" in q:
        return q, str(len(s.objects))
    if len(s.objects) != 1:
        return None
    return q, s.objects[0].colour if "colour" in q else s.objects[0].shape


def _record(rng: random.Random, images: list[str], turns: list[QA]) -> list[dict[str, str]]:
    conv = []
    for i, (q, a) in enumerate(turns):
        q = vary(q, rng) if a not in (REFUSAL,) or rng.random() < 0.5 else q
        head = "".join(f"{m}\n" for m in images) if i == 0 else ""
        conv.append({"role": "user", "content": head + q})
        conv.append({"role": "assistant", "content": a})
    return conv


KIND_WEIGHTS = {"shapes": 0.5, "text": 0.3, "other": 0.1, "pair": 0.08, "none": 0.02}
OPEN_WORLD_KIND_WEIGHTS = {"shapes": 0.5, "text": 0.26, "other": 0.14, "pair": 0.08, "none": 0.02}


def write_split(out: Path, name: str, n: int, seed: int, weights: dict[str, float] | None = None,
                open_world: bool = False, real_photos: bool = False) -> Path:
    """Write ``n`` records (canvas PNGs under ``out/name/``) to ``out/name.json``; returns that path.

    ``open_world`` (the recipe's ``stage2_open_world``; off here, on in the recipe) adds composed out-of-world
    questions, draws the "other" pictures from ``STAGE2_OTHER_STYLES`` and gives them more chats;
    ``real_photos`` (``stage2_real_photos``) makes 40% of the "other" pictures crops of real photos
    (``synthetic_other.photo_dir``)."""
    weights = weights or (OPEN_WORLD_KIND_WEIGHTS if open_world else KIND_WEIGHTS)
    rng = random.Random(seed)
    (out / name).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    while len(records) < n:
        i = len(records)
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
        rec = _make_record(out, name, i, kind, rng, open_world, real_photos)
        if rec is not None:
            records.append(rec)
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, indent=0))
    return path


def _make_record(out: Path, name: str, i: int, kind: str, rng: random.Random, open_world: bool,
                 real_photos: bool) -> dict[str, Any] | None:
    if kind == "none":
        q = rng.choice(("Hello!", "What can you do?", "How are you?", "What colour is the sky?", "Hi"))
        return {"id": f"{name}-{i}", "conversations": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": NO_IMAGE}]}
    if kind == "pair":
        a, b = (make_scene(rng, "shapes", n_objects=rng.randint(1, MAX_OBJECTS)) for _ in range(2))
        turns = [t for _ in range(2) if (t := two_image_turn(a, b, rng))]
        if not turns:
            return None
        paths = {}
        for j, s in enumerate((a, b)):
            rel = f"{name}/{i:06d}_{j}.png"
            render(s).save(out / rel)
            paths[f"<image_{j:02d}>"] = rel
        return {"id": f"{name}-{i}", "image": paths, "conversations": _record(rng, list(paths), turns), "kind": kind}
    scene = make_scene(rng, kind)
    if kind == "other" and open_world:
        scene = dataclasses.replace(scene, style=rng.choice(STAGE2_OTHER_STYLES))
    if kind == "other" and real_photos and rng.random() < 0.4:
        scene = dataclasses.replace(scene, style="real_photo")
    turns = scene_turns(scene, rng, rng.choice((1, 2, 3, 3, 4)), open_world)
    if not turns:
        return None
    rel = f"{name}/{i:06d}.png"
    render(scene).save(out / rel)
    return {"id": f"{name}-{i}", "image": rel, "conversations": _record(rng, ["<image>"], turns), "kind": kind}


def answer_chars() -> str:
    """Characters the answers can contain (for the tokenizer check)."""
    return ALPHABET + " .,:\"'"
