"""``llama-steer eval``: does steering work on *my* model, with which heads, at what cost?

    head_sets(spec, headmap) .. "top:10,random:10,bottom:10,all" -> {name: heads}
    objects_in(text) .......... the vocabulary objects a reply names, in order (exact judge)
    caption_judge ............. token-F1 overlap with per-panel captions (user folders)
    Evaluator ................. one model + chat handler; runs the experiments:
        narration   the ambiguous "What is in this panel?" steered to panels 2..6
        vqa         "What is in panel i?" steered to a panel j != i
        box         "What objects are in the image?" on scenes, steered with box: to one
                    object's bounding box: does the answer now open with it?
        dynamic     "Describe the strip." with a derangement schedule switching every N
                    tokens, per head set: per-segment accuracy, Spearman(schedule,
                    described panel), whether the narration stays well formed ("a X, then
                    a Y, ...") and its stutter rate, and the panel the steered heads attend
                    to at every token (staircase)
        pope        yes/no object presence on scenes (random / popular / adversarial
                    negatives): accuracy, precision, recall, F1, yes-ratio, unsteered vs
                    image-boost
        sweep       narration over top-k x strength: accuracy, attention focus gained on
                    the target panel, KL(original || steered) of the next-token
                    distribution, distinct-2 (the seed 002 trade-off)
    main() .................... the CLI: JSON report + PNG plots in an output folder

Every accuracy comes with a 95% bootstrap interval. Targets showing the same object as the
unsteered answer's panel are skipped (a correct steer could not change the text).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from llama_steer import comics
from llama_steer._errors import SteeringError
from llama_steer.messages import user_message
from llama_steer.metrics import bootstrap_ci, distinct_n, spearman, stutter_rate
from llama_steer.metrics import kl as kl_
from llama_steer.roi import Box

_COLOUR, _SHAPE = "|".join(comics.COLOURS), "|".join(comics.SHAPES)
_OBJ = re.compile(rf"\b({_COLOUR})\s+({_SHAPE})\b")
_OBJ_NAME = re.compile(f"a ({_COLOUR}) ({_SHAPE})")


def well_formed(text: str) -> bool:
    """Whether ``text`` reads as the embedded model's narration "a X, then a Y, ...", allowing
    a last object cut off by the token limit."""
    parts = text.strip().lower().split(", then ")
    if any(not _OBJ_NAME.fullmatch(p) for p in parts[:-1]):
        return False
    last = parts[-1]
    names = (f"a {c} {s}" for c in comics.COLOURS for s in comics.SHAPES)
    return last != "" and any(n.startswith(last) for n in names)


def objects_in(text: str) -> list[str]:
    """'a red circle, then a blue square' -> ['a red circle', 'a blue square']."""
    return [f"a {c} {s}" for c, s in _OBJ.findall(text.lower())]


def caption_judge(answer: str, captions: list[str]) -> int:
    """1-based panel whose caption overlaps the answer most (token F1), 0 when none does."""
    a = Counter(re.findall(r"\w+", answer.lower()))
    best, best_f1 = 0, 0.0
    for k, cap in enumerate(captions, 1):
        c = Counter(re.findall(r"\w+", cap.lower()))
        common = sum((a & c).values())
        if common == 0:
            continue
        p, r = common / sum(a.values()), common / sum(c.values())
        f1 = 2 * p * r / (p + r)
        if f1 > best_f1:
            best, best_f1 = k, f1
    return best


def panel_roi(desc, k: int) -> str:
    """The ROI of panel ``k`` (1-based) of a strip: its own pixel box. Panels of a
    ``comics`` v2 strip have their own widths and heights, so an equal grid
    (``panel:k@RxC``) would cut across them."""
    x0, y0, x1, y1 = desc.panels[k - 1].box
    return f"box:{x0},{y0},{x1},{y1}"


def panel_of(desc) -> dict[str, int]:
    """{object name: its 1-based panel} of a strip."""
    return {p.thing.name: p.index for p in desc.panels}


def judge_schedule(pieces, targets, order, panels: dict, every: int):
    """Judge one dynamic narration. pieces: the generated text, one string per token;
    targets: the panel steered to at each token; order: the schedule (panel per segment of
    ``every`` tokens); panels: {object name: panel}.

    Returns (per-segment hits: 1.0 when a segment names its scheduled panel's object,
    allowing 3 tokens of lag; segments naming nothing are not judged, and (target at the
    token an object's name ends, that object's panel) for every named object the strip
    holds. An object the strip does not hold describes no panel: it is a miss of its
    segment but gets no rank in the correlation (as "panel 0" it would rank below panel 1).
    """
    said, pos = "", []
    for t, piece in enumerate(pieces):
        said += piece
        found = objects_in(said)
        while len(pos) < len(found):
            pos.append((t, found[len(pos)]))
    hits = []
    for seg, want in enumerate(order):
        lo, hi = seg * every, (seg + 1) * every
        names = [panels.get(nm, 0) for t, nm in pos if lo <= t < hi + 3]
        if names:
            hits.append(float(want in names))
    described = [(targets[t], panels[name]) for t, name in pos if name in panels]
    return hits, described


def head_sets(spec: str, headmap, seed: int = 0) -> dict:
    """{"top:10": [(l, h), ...], "random:10": ..., "bottom:10": ..., "all": "all"}."""
    out = {}
    for item in spec.split(","):
        item = item.strip()
        if item == "all":
            out[item] = "all"
            continue
        m = re.fullmatch(r"(top|random|bottom):(\d+)", item)
        if not m:
            raise SteeringError(f"head set {item!r}: use top:K, random:K, bottom:K or all")
        if headmap is None:
            raise SteeringError(f"head set {item!r} needs --headmap")
        kind, k = m.group(1), int(m.group(2))
        out[item] = (
            headmap.random(k, seed=seed)
            if kind == "random"
            else (headmap.top(k) if kind == "top" else headmap.bottom(k))
        )
    return out


class Evaluator:
    """Runs the experiments on one steering Llama with an mtmd chat handler."""

    def __init__(
        self,
        llm,
        strength: float,
        decode_only: bool = True,
        max_tokens: int = 12,
        focus: str | None = None,
        renderer: str = "sdf",
        mode: str = "redirect",
    ):
        self.llm, self.steer = llm, llm.steering
        self.strength, self.decode_only, self.max_tokens = strength, decode_only, max_tokens
        self.focus, self.renderer, self.mode = focus, renderer, mode

    def draw(self, desc):
        """The image of a strip or scene: a v2 one drawn by this evaluation's renderer, a
        v1 one (``comics.make_strip``) by v1's own Pillow code."""
        if isinstance(desc, (comics.StyledStrip, comics.StyledScene)):
            return comics.render_v2(desc, self.renderer)
        return comics.render(desc)

    def ask(self, img, question: str, max_tokens: int | None = None) -> str:
        m = [user_message(question, [img])]
        out = self.llm.create_chat_completion(
            m, max_tokens=max_tokens or self.max_tokens, temperature=0
        )
        return out["choices"][0]["message"]["content"].strip()

    def _steer(self, heads, roi) -> None:
        self.steer.update(
            heads=heads,
            roi=roi,
            mode=self.mode,
            strength=self.strength,
            decode_only=self.decode_only,
            focus=self.focus,
        )

    def _off(self) -> None:
        # the ROI goes too: a pixel box of this image need not fit the next one
        self.steer.update(strength=0.0, roi=None)

    def steered_narrations(self, desc, img, heads):
        """Yields (k, answer) for each panel k = 2..6 of strip ``desc`` (drawn as ``img``)
        whose object differs from panel 1's: "What is in this panel?" steered by ``heads`` to
        panel k's pixel box (a steer to panel 1's object could not show in the text)."""
        for k in range(2, 7):
            if desc.panels[k - 1].thing.name == desc.panels[0].thing.name:
                continue
            self._steer(heads, panel_roi(desc, k))
            yield k, self.ask(img, "What is in this panel?")

    # -- experiments ------------------------------------------------------------------------
    def narration(self, strips, sets: dict) -> dict:
        recs = {name: [] for name in sets}
        degen = {name: [] for name in sets}
        for desc in strips:
            img = self.draw(desc)
            self._off()
            base = self.ask(img, "What is in this panel?")
            for name, heads in sets.items():
                for k, ans in self.steered_narrations(desc, img, heads):
                    named = objects_in(ans)
                    ok = ans != base and named[:1] == [desc.panels[k - 1].thing.name]
                    recs[name].append(float(ok))
                    degen[name].append(distinct_n(ans.split(), 2))
        return self._summary(recs, degen)

    def vqa(self, strips, sets: dict, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        recs = {name: [] for name in sets}
        degen = {name: [] for name in sets}
        for desc in strips:
            img = self.draw(desc)
            i = int(rng.integers(1, 7))
            j = int(rng.choice([x for x in range(1, 7) if x != i]))
            if desc.panels[i - 1].thing.name == desc.panels[j - 1].thing.name:
                continue
            for name, heads in sets.items():
                self._steer(heads, panel_roi(desc, j))
                ans = self.ask(img, f"What is in panel {i}?")
                recs[name].append(float(objects_in(ans)[:1] == [desc.panels[j - 1].thing.name]))
                degen[name].append(distinct_n(ans.split(), 2))
        return self._summary(recs, degen)

    def box(self, scenes, sets: dict) -> dict:
        """Scenes asked "What objects are in the image?", steered with ``box:`` to one object's
        bounding box (pixels): success when the answer now opens with that object. Objects
        the unsteered answer already opens with are skipped."""
        recs = {name: [] for name in sets}
        degen = {name: [] for name in sets}
        q = "What objects are in the image?"
        for desc in scenes:
            img = self.draw(desc)
            self._off()
            base = self.ask(img, q, max_tokens=24)
            first = objects_in(base)[:1]
            for name, heads in sets.items():
                for t in desc.things:
                    if [t.name] == first:
                        continue
                    w, h = desc.size
                    x0, y0, x1, y1 = t.box
                    x0, x1 = max(x0, 0), min(x1, w)
                    y0, y1 = max(y0, 0), min(y1, h)
                    self._steer(heads, f"box:{x0},{y0},{x1},{y1}")
                    ans = self.ask(img, q, max_tokens=24)
                    recs[name].append(float(objects_in(ans)[:1] == [t.name]))
                    degen[name].append(distinct_n(ans.split(), 2))
        return self._summary(recs, degen)

    def dynamic(self, strips, heads, every: int = 5, seed: int = 0, n_tokens: int = 48) -> dict:
        """Narration with the target switched every ``every`` generated tokens along a random
        derangement of the panels (no panel stays in its reading-order slot)."""
        rng = np.random.default_rng(seed)
        seg_ok, rhos, stairs, formed, stutter = [], [], [], [], []
        for desc in strips:
            img = self.draw(desc)
            order = _derangement(rng)
            m = [user_message("Describe the strip.", [img])]
            self._steer(heads, panel_roi(desc, order[0]))
            self.llm.create_chat_completion(m, max_tokens=1, temperature=0)  # lays out the image
            panels = [Box(*p.box) for p in desc.panels]
            text, targets, attended = [], [], []
            with self.steer.observe(panels) as obs:
                stream = self.llm.create_chat_completion(
                    m, max_tokens=n_tokens, temperature=0, stream=True
                )
                n = 0
                for chunk in stream:
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece is None:
                        continue
                    attended.append(int(np.argmax(obs.mass())) + 1)  # steered heads' panel
                    target = order[min(n // every, 5)]
                    text.append(piece)
                    targets.append(target)
                    n += 1
                    if n % every == 0 and n // every < 6:
                        self.steer.retarget(panel_roi(desc, order[n // every]))
            hits, described = judge_schedule(text, targets, order, panel_of(desc), every)
            seg_ok.extend(hits)
            if len(described) >= 2:
                r = spearman([a for a, _ in described], [b for _, b in described])
                if np.isfinite(r):
                    rhos.append(r)
            said = "".join(text)
            formed.append(float(well_formed(said)))
            stutter.append(stutter_rate(re.findall(r"\w+", said.lower())))
            stairs.append({"targets": targets, "attended": attended, "text": said})
        return {
            "segment_accuracy": _ci(seg_ok),
            "spearman": _ci(rhos),
            "well_formed": _ci(formed),
            "stutter": _ci(stutter),
            "staircases": stairs[:3],
        }

    def pope(self, scenes, boost_heads, boost_strength: float, seed: int = 0) -> dict:
        qs = pope_questions(scenes, seed)
        out = {}
        for setting in ("unsteered", "image-boost"):
            if setting == "unsteered":
                self._off()
            else:
                self.steer.update(
                    heads=boost_heads,
                    roi=None,
                    mode="image-boost",
                    strength=boost_strength,
                    decode_only=False,
                )
            by_kind: dict = {}
            for desc, kind, q, truth in qs:
                ans = self.ask(self.draw(desc), q, max_tokens=3).lower()
                said = "yes" if ans.startswith("yes") else "no" if ans.startswith("no") else "?"
                by_kind.setdefault(kind, []).append((truth, said))
            out[setting] = {k: _pope_scores(v) for k, v in by_kind.items()}
        self._off()
        return out

    def sweep(self, strips, headmap, ks: list[int], strengths: list[float]) -> list[dict]:
        """Narration steered to panels 2..6 for every (k, strength)."""
        rows_out = []
        base: dict = {}
        for k in ks:
            heads = headmap.top(k)
            self.steer.update(heads=heads, strength=0.0)
            for s in strengths:
                acc, focus, kls, dist = [], [], [], []
                for i, desc in enumerate(strips):
                    img = self.draw(desc)
                    if i not in base:
                        self._off()
                        base[i] = self._probe(img)
                    for t in range(2, 7):
                        if desc.panels[t - 1].thing.name == desc.panels[0].thing.name:
                            continue
                        self.steer.update(
                            heads=heads,
                            roi=panel_roi(desc, t),
                            mode=self.mode,
                            strength=s,
                            decode_only=self.decode_only,
                            focus=self.focus,
                        )
                        ans, logits, att = self._probe(img)
                        b_ans, b_logits, _ = base[i]
                        ok = ans != b_ans and objects_in(ans)[:1] == [desc.panels[t - 1].thing.name]
                        acc.append(float(ok))
                        if logits is not None and b_logits is not None:
                            kls.append(float(kl_(b_logits, logits)))
                        g = self.llm.images[0].grid
                        cells = g.box_tokens(*desc.panels[t - 1].box)
                        focus.append(
                            float(att[cells].sum() - base[i][2][cells].sum())
                            if base[i][2] is not None
                            else 0.0
                        )
                        dist.append(distinct_n(ans.split(), 2))
                rows_out.append(
                    {
                        "k": k,
                        "strength": s,
                        "accuracy": _ci(acc),
                        "focus_gain": float(np.mean(focus)) if focus else 0.0,
                        "kl": float(np.mean(kls)) if kls else 0.0,
                        "distinct_2": float(np.mean(dist)) if dist else 1.0,
                    }
                )
        self._off()
        return rows_out

    def _probe(self, img):
        """Answer the ambiguous question; return (answer, logits for the 2nd answer token,
        steered heads' attention per image token at the 2nd answer token)."""
        from llama_cpp._utils import suppress_stdout_stderr

        m = [user_message("What is in this panel?", [img])]
        with suppress_stdout_stderr(disable=self.llm.verbose):
            self.llm.create_chat_completion(m, max_tokens=1, temperature=0)
        text, logits, att = [], None, None
        with self.steer.observe("image-tokens") as obs:
            with suppress_stdout_stderr(disable=self.llm.verbose):
                for chunk in self.llm.create_chat_completion(
                    m, max_tokens=self.max_tokens, temperature=0, stream=True
                ):
                    piece = chunk["choices"][0]["delta"].get("content")
                    if piece is None:
                        continue
                    text.append(piece)
                    if len(text) == 2:  # logits and attention of the step after "a"
                        v = self.llm.n_vocab()
                        logits = np.ctypeslib.as_array(
                            self.llm._ctx.get_logits(), shape=(v,)
                        ).copy()
                        att = obs.mass()  # the steered heads, per image token
        return "".join(text).strip(), logits, att

    @staticmethod
    def _summary(recs: dict, degen: dict) -> dict:
        return {
            name: {
                "n": len(v),
                "accuracy": _ci(v),
                "distinct_2": float(np.mean(degen[name])) if degen[name] else None,
            }
            for name, v in recs.items()
        }


def _ci(v) -> dict:
    mean, lo, hi = bootstrap_ci(v)
    return {"mean": mean, "ci95": [lo, hi], "n": len(v)}


def _derangement(rng) -> list[int]:
    while True:
        p = list(rng.permutation(6) + 1)
        if all(p[i] != i + 1 for i in range(6)):
            return [int(x) for x in p]


def pope_questions(scenes, seed: int = 0) -> list[tuple]:
    """(scene, kind, question, truth) with one present object and one absent object of each
    kind per scene: random, popular (most frequent objects overall), adversarial (shares
    colour or shape with something present)."""
    rng = np.random.default_rng(seed)
    freq = Counter((t.colour, t.shape) for s in scenes for t in s.things)
    popular = [o for o, _ in freq.most_common()]
    everything = [(c, s) for c in comics.COLOURS for s in comics.SHAPES]
    out = []
    for sc in scenes:
        present = {(t.colour, t.shape) for t in sc.things}
        t = sc.things[int(rng.integers(len(sc.things)))]
        absent = [o for o in everything if o not in present]
        near = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in present)]
        picks = {
            "random": absent[int(rng.integers(len(absent)))],
            "popular": next(o for o in popular + absent if o not in present),
            "adversarial": near[int(rng.integers(len(near)))] if near else absent[0],
        }
        for kind, (c, s) in picks.items():
            out.append((sc, kind, f"Is there a {t.colour} {t.shape}?", "yes"))
            out.append((sc, kind, f"Is there a {c} {s}?", "no"))
    return out


def _pope_scores(pairs) -> dict:
    truth = np.array([t == "yes" for t, _ in pairs])
    said = np.array([s == "yes" for _, s in pairs])
    tp, fp = int((truth & said).sum()), int((~truth & said).sum())
    fn = int((truth & ~said).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(pairs),
        "accuracy": _ci((truth == said).astype(float)),
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "yes_ratio": float(said.mean()),
    }


def bar_png(results: dict, path: Path, title: str) -> None:
    """Accuracy per head set with its 95% interval."""
    from PIL import Image, ImageDraw

    names = list(results)
    w, h, left, bottom = 120 * len(names) + 60, 260, 40, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill="black")
    top = 24
    scale = h - top - bottom
    d.line([left, h - bottom, w - 10, h - bottom], fill="black")
    for i, name in enumerate(names):
        acc = results[name]["accuracy"]
        x = left + 20 + i * 120
        y = h - bottom - acc["mean"] * scale
        d.rectangle([x, y, x + 60, h - bottom], fill=(60, 120, 180))
        lo, hi = (h - bottom - v * scale for v in acc["ci95"])
        d.line([x + 30, lo, x + 30, hi], fill="black", width=2)
        d.text((x, h - bottom + 4), name, fill="black")
        d.text((x, y - 14), f"{acc['mean']:.0%}", fill="black")
    img.save(path)


def staircase_png(stair: dict, path: Path) -> None:
    """Target panel (steps) and the panel the steered heads attend to (dots) per token."""
    from PIL import Image, ImageDraw

    t, a = stair["targets"], stair["attended"]
    n = max(len(t), 1)
    cw, w, h, left = 8, max(8 * n + 60, 440), 200, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (6, 4), "target panel (line) vs attended panel (dots), per generated token", fill="black"
    )

    def y(panel):
        return h - 20 - (panel - 1) * 28

    for p in range(1, 7):
        d.text((6, y(p) - 6), str(p), fill="black")
    for i in range(len(t) - 1):
        d.line(
            [left + i * cw, y(t[i]), left + (i + 1) * cw, y(t[i + 1])], fill="firebrick", width=2
        )
    for i, p in enumerate(a):
        d.ellipse([left + i * cw - 2, y(p) - 2, left + i * cw + 2, y(p) + 2], fill=(40, 90, 200))
    img.save(path)


def sweep_png(rows: list[dict], path: Path) -> None:
    """Left: accuracy vs strength, one line per k. Right: focus gained vs KL per point."""
    from PIL import Image, ImageDraw

    w, h, pad = 760, 300, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    ks = sorted({r["k"] for r in rows})
    ss = sorted({r["strength"] for r in rows})
    colours = [(200, 40, 40), (40, 120, 200), (40, 160, 80), (150, 80, 180), (220, 140, 20)]

    def panel(x0, title, xs, ys, xlabel):
        d.text((x0 + 4, 4), title, fill="black")
        d.rectangle([x0 + pad, 20, x0 + 360, h - pad], outline="black")
        d.text((x0 + pad, h - pad + 6), xlabel, fill="black")
        return (x0 + pad, 20, x0 + 360, h - pad)

    box = panel(0, "narration accuracy vs strength (per top-k)", ss, None, "strength ->")
    smax = max(ss) or 1.0
    for ci, k in enumerate(ks):
        pts = [
            (
                box[0] + (r["strength"] / smax) * (box[2] - box[0] - 10) + 5,
                box[3] - r["accuracy"]["mean"] * (box[3] - box[1]),
            )
            for r in rows
            if r["k"] == k
        ]
        pts.sort()
        col = colours[ci % len(colours)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.text((box[0] + 6, box[1] + 4 + 12 * ci), f"k={k}", fill=col)
    box = panel(380, "focus gained (y) vs KL(original||steered) (x)", None, None, "KL ->")
    kmax = max((r["kl"] for r in rows), default=1.0) or 1.0
    fmax = max((abs(r["focus_gain"]) for r in rows), default=1.0) or 1.0
    for r in rows:
        col = colours[ks.index(r["k"]) % len(colours)]
        x = box[0] + 5 + r["kl"] / kmax * (box[2] - box[0] - 10)
        y = box[3] - (0.5 + 0.5 * r["focus_gain"] / fmax) * (box[3] - box[1])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.text((x + 4, y - 6), f"{r['strength']:g}", fill=col)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    from llama_steer.apps.cli import CliError, add_model_args, load, resolve_model
    from llama_steer.headmap import RECOMMENDED, Headmap
    from llama_steer.steering import Steering

    p = argparse.ArgumentParser(
        prog="llama-steer eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "experiments",
        help="comma list of vqa,narration,box,dynamic,pope,sweep (all: the first five)",
    )
    add_model_args(p)
    p.add_argument("--headmap")
    p.add_argument("--heads", default="top:10,random:10,bottom:10,all", dest="sets")
    p.add_argument("--strength", type=float, default=None, help="default: the headmap's")
    p.add_argument(
        "--mode",
        default=None,
        choices=["redirect", "reroute"],
        help="how steered heads are moved to the panel (default: the headmap's, else redirect)",
    )
    p.add_argument(
        "--focus",
        choices=["content", "none"],
        default=None,
        help="image ROIs: only tokens showing something (default: the headmap's, else none)",
    )
    p.add_argument("--n-strips", type=int, default=100)
    p.add_argument(
        "--layout",
        default="all",
        choices=["all", *comics.LAYOUTS_V2],
        help="strip layouts, in turn (all: 1x6, 2x3, 3x2, 6x1)",
    )
    p.add_argument(
        "--renderer",
        default=comics.HELDOUT_RENDERERS[0],
        choices=[*comics.RENDERERS_V2, "v1"],
        help="drawing code of the strips and scenes (default: the one organism v2 never saw "
        "in training); v1: organism v1's strips (Pillow, 84-px panels, 1x6 and 2x3 only)",
    )
    p.add_argument(
        "--sizes",
        default="heldout",
        choices=comics.SIZES,
        help="panel and scene sides: heldout = in bands training never drew",
    )
    p.add_argument(
        "--every",
        type=int,
        default=5,
        help="dynamic: tokens per target (5 = one object of the embedded model's narration, "
        '"a red circle, then")',
    )
    p.add_argument("--boost-layers", default=None, help="pope: layers:A-B for image-boost")
    p.add_argument("--boost-strength", type=float, default=2.0)
    p.add_argument("--eval-seed", type=int, default=0, help="which held-out strips and draws")
    p.add_argument("--ks", default="1,5,10,20", help="sweep: top-k values")
    p.add_argument("--strengths", default="2,4,8,16", help="sweep: strengths")
    p.add_argument("-o", "--out", default="report")
    args = p.parse_args(argv)
    exps = (
        ["vqa", "narration", "box", "dynamic", "pope"]
        if args.experiments == "all"
        else [e.strip() for e in args.experiments.split(",")]
    )
    for e in exps:
        if e not in ("vqa", "narration", "box", "dynamic", "pope", "sweep"):
            raise CliError(
                f"unknown experiment {e!r}: vqa, narration, box, dynamic, pope, sweep, all"
            )
    if "sweep" in exps and not args.headmap:
        raise CliError("the sweep ranks heads: pass --headmap")
    model, mmproj = resolve_model(args)
    if not mmproj:
        raise CliError("evaluation needs a vision model: pass --mmproj")
    hm = Headmap.load(args.headmap) if args.headmap else None
    if hm is not None:
        hm.check_model(model, strict=False)
    rec = hm.recommended() if hm else RECOMMENDED
    strength = args.strength if args.strength is not None else float(rec["strength"])
    args.model, args.mmproj, args.image = model, mmproj, []
    llm, _ = load(args, Steering(strength=0.0))  # observer only, until steered
    L = llm.steering.mask.shape[0]
    sets = head_sets(args.sets, hm, seed=args.eval_seed)
    v1 = args.renderer == "v1"
    layouts = ["2x3", "1x6"] if v1 else list(comics.LAYOUTS_V2)  # v1: wave 1's order
    if args.layout != "all":
        if args.layout not in layouts:
            raise CliError(f"--layout {args.layout}: v1 strips have {', '.join(layouts)}")
        layouts = [args.layout]
    base = 5 * 10**9 + 1000 * args.eval_seed  # seeds no training used
    if v1:
        strips = [
            comics.make_strip(base + i, layouts[i % len(layouts)]) for i in range(args.n_strips)
        ]
        scenes = [comics.make_scene(base + i) for i in range(args.n_strips)]
    else:
        strips = [
            comics.make_strip_v2(base + i, layouts[i % len(layouts)], args.sizes)
            for i in range(args.n_strips)
        ]
        scenes = [comics.make_scene_v2(base + i, args.sizes) for i in range(args.n_strips)]
    focus = args.focus or rec["focus"]
    mode = args.mode or (rec.get("mode") if rec.get("mode") in ("redirect", "reroute") else None)
    ev = Evaluator(
        llm,
        strength,
        focus=None if focus == "none" else focus,
        renderer=args.renderer,
        mode=mode or "redirect",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model,
        "headmap": args.headmap,
        "strength": strength,
        "mode": ev.mode,
        "focus": ev.focus,
        "n_strips": args.n_strips,
        "renderer": args.renderer,
        "sizes": args.sizes,
        "layouts": layouts,
        "head_sets": {
            k: v if isinstance(v, str) else [list(x) for x in v] for k, v in sets.items()
        },
    }
    t0 = time.time()
    try:
        if "narration" in exps:
            report["narration"] = ev.narration(strips, sets)
            bar_png(report["narration"], out / "narration.png", "narration: steered to panel k")
        if "box" in exps:
            report["box"] = ev.box(scenes, sets)
            bar_png(report["box"], out / "box.png", "scenes: steered to one object's box")
        if "vqa" in exps:
            report["vqa"] = ev.vqa(strips, sets, seed=args.eval_seed)
            bar_png(report["vqa"], out / "vqa.png", "vqa: asked panel i, steered to j")
        if "dynamic" in exps:
            report["dynamic"] = {
                name: ev.dynamic(
                    strips[: max(1, args.n_strips // 2)], heads, args.every, args.eval_seed
                )
                for name, heads in sets.items()
            }
            first = next(iter(report["dynamic"]))
            for i, st in enumerate(report["dynamic"][first]["staircases"]):
                staircase_png(st, out / f"dynamic_staircase_{i}.png")
        if "pope" in exps:
            boost = args.boost_layers or f"layers:0-{L - 1}"
            report["pope"] = ev.pope(scenes, boost, args.boost_strength, seed=args.eval_seed)
        if "sweep" in exps:
            ks = [k for k in (int(x) for x in args.ks.split(",")) if k <= len(hm.heads)]
            ss = [float(x) for x in args.strengths.split(",")]
            report["sweep"] = ev.sweep(strips[: max(1, args.n_strips // 4)], hm, ks, ss)
            sweep_png(report["sweep"], out / "sweep.png")
    finally:
        llm.close()
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for e in ("narration", "vqa", "box"):
        for name, r in report.get(e, {}).items():
            a = r["accuracy"]
            print(
                f"{e:9s} {name:10s} {a['mean']:6.1%}  [{a['ci95'][0]:.0%}, {a['ci95'][1]:.0%}]"
                f"  n={r['n']}"
            )
    for name, d in report.get("dynamic", {}).items():
        print(
            f"dynamic   {name:10s} segment accuracy {d['segment_accuracy']['mean']:.1%}, "
            f"Spearman {d['spearman']['mean']:.2f}, well formed {d['well_formed']['mean']:.0%}, "
            f"stutter {d['stutter']['mean']:.2f}"
        )
    if "pope" in report:
        for setting, kinds in report["pope"].items():
            print(
                "pope      "
                + setting
                + ": "
                + ", ".join(
                    f"{k} F1 {v['f1']:.3f} acc {v['accuracy']['mean']:.1%} yes {v['yes_ratio']:.0%}"
                    for k, v in kinds.items()
                )
            )
    for r in report.get("sweep", []):
        print(
            f"sweep     k={r['k']:<3d} strength {r['strength']:<5g} accuracy "
            f"{r['accuracy']['mean']:6.1%}  focus {r['focus_gain']:+.3f}  KL {r['kl']:.3f}  "
            f"distinct-2 {r['distinct_2']:.2f}"
        )
    print(f"wrote {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
