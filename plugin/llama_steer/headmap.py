"""Headmaps: the ranked attention heads of one model, and how they were found.

    Headmap ............. dataclass; from_json / to_json (a round trip is equal), load / save
    Headmap.top(k) ...... the k best heads as (layer, head) pairs, for Steering(heads=...)
    Headmap.recommended()   its defaults, with RECOMMENDED filling what it leaves out
    Headmap.bottom(k), Headmap.random(k, seed)   the paper's control head sets
    Headmap.check_model(path)   refuse a headmap made for another model
    ModelIdentity ....... architecture, n_layer, n_head, n_head_kv, GGUF header fingerprint
    HeadmapError ........ a bad file; the message names the bad key
    NotAHeadmap ......... a plain ranking given where a headmap is expected (convert it)
    convert_command() ... the scripts/convert_headmap.py command line that converts a ranking
    find_headmap(model)   the headmap for a model: shipped ones, then the user's directory
    headmap_dirs() ...... where they are looked up ($LLAMA_STEER_HEADMAPS overrides the user's)

Schema (version 1, JSON)::

    {"version": 1,
     "model": {"architecture": "qwen2vl", "n_layer": 6, "n_head": 8, "n_head_kv": 2,
               "fingerprint": "<sha256 of the GGUF header>" or null, "name": "..."},
     "method": {"name": "gaze", "command": "...", ...free-form parameters...},
     "heads": [{"layer": 3, "head": 5, "score": 0.41}, ...],     best first
     "scores": [[...n_head...], ...n_layer...] or null,          the full matrix
     "defaults": {"top_k": 10, "mode": "redirect", "strength": 6.0}}

``defaults`` (all optional) are what the CLI uses when a flag is not given: top_k (int), mode
(str, a steering mode), strength (number), decode_only (bool), focus (null or "content").
A key left out takes its value from ``RECOMMENDED`` (the gaze-heads recipe).

A null (or absent) fingerprint means the map was made without the GGUF at hand (converted from
a published ranking, the shape given by hand): it matches a model by architecture and shape.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llama_steer._errors import SteeringError

__all__ = [
    "RECOMMENDED",
    "HeadScore",
    "Headmap",
    "HeadmapError",
    "ModelIdentity",
    "NotAHeadmap",
    "convert_command",
    "find_headmap",
    "headmap_dirs",
]

VERSION = 1


class HeadmapError(SteeringError):
    """A headmap that cannot be used; the message names the key or the mismatch."""


class NotAHeadmap(HeadmapError):
    """A plain ranking (a list of {layer, head, score}) where a headmap is expected; ``path``
    is the file, so a caller that knows the model can give the exact conversion command."""

    def __init__(self, path: str | Path, model: str | None = None):
        self.path = str(path)
        super().__init__(
            f"{path} is a plain ranking (a list of {{layer, head, score}}), not a llama-steer "
            "headmap (a JSON object with version 1 and the model it is for): convert it with\n"
            f"    {convert_command(path, model)}"
        )


def convert_command(source: str | Path, model: str | None = None) -> str:
    """The command line that turns the ranking ``source`` into a headmap for ``model``."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "convert_headmap.py"
    script = script if script.exists() else Path("scripts/convert_headmap.py")  # an sdist
    src = Path(source)
    out = src.with_name(src.stem + ".headmap.json")
    target = (
        f"--model {shlex.quote(str(model))}"
        if model
        else "--model MODEL.gguf (or, without the GGUF: --arch A --n-layer L --n-head H "
        "--n-head-kv K --name NAME)"
    )
    q = shlex.quote
    return f"python {q(str(script))} {q(str(src))} {target} -o {q(str(out))}"


def _need(d: dict, key: str, kind, where: str):
    if not isinstance(d, dict) or key not in d:
        raise HeadmapError(f"headmap: missing key {where}{key!r}")
    v = d[key]
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise HeadmapError(f"headmap: key {where}{key!r} must be {name}, got {v!r}")
    return v


_DEFAULTS = {
    "top_k": int,
    "mode": str,
    "strength": (int, float),
    "decode_only": bool,
    "focus": (str, type(None)),
}


# what a headmap's missing defaults mean: the gaze-heads recipe (a few heads, redirect, edits
# on generated tokens only: prefill edits with many heads break a small model's answers)
RECOMMENDED = {
    "top_k": 10,
    "mode": "redirect",
    "strength": 8.0,
    "decode_only": True,
    "focus": None,
}


def _check_defaults(d) -> dict:
    if not isinstance(d, dict):
        raise HeadmapError(f"headmap: key 'defaults' must be an object, got {d!r}")
    for k in d:
        if k not in _DEFAULTS:
            raise HeadmapError(
                f"headmap: unknown key defaults.{k!r}; known: {', '.join(_DEFAULTS)}"
            )
        _need(d, k, _DEFAULTS[k], "defaults.")
    return d


@dataclass(frozen=True)
class HeadScore:
    layer: int
    head: int
    score: float


@dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    # sha256 of the GGUF header; "" or None: not known (a map made without the GGUF), then a
    # model matches by architecture and shape
    fingerprint: str | None = ""
    name: str = ""

    @classmethod
    def of_gguf(cls, path: str | Path) -> ModelIdentity:
        """Identity of a GGUF model file, read from its header (no weights loaded)."""
        from llama_steer._gguf import GGUFError, check_gguf, fingerprint

        try:
            meta = check_gguf(path)
        except GGUFError as e:
            fix = "download it again" if "truncated" in str(e) else "pass the model's .gguf file"
            raise HeadmapError(f"{e}: {fix}") from None
        arch = meta.get("general.architecture")
        try:
            n_layer = int(meta[f"{arch}.block_count"])
            n_head = meta[f"{arch}.attention.head_count"]
            n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
        except KeyError as e:
            raise HeadmapError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
        # per-layer head counts come as arrays; the hook addresses query heads up to the max
        n_head = int(max(n_head)) if isinstance(n_head, list) else int(n_head)
        n_kv = int(max(n_kv)) if isinstance(n_kv, list) else int(n_kv)
        return cls(
            arch, n_layer, n_head, n_kv, fingerprint(path), str(meta.get("general.name", ""))
        )


@dataclass
class Headmap:
    """Ranked heads of one model.

    >>> hm = Headmap.load("headmaps/organism.json")
    >>> Steering(heads=hm.top(10), roi=Panel(4, of=6), mode="redirect", strength=6)
    >>> hm.random(10, seed=0), hm.bottom(10)          # control head sets of the same size
    """

    model: ModelIdentity
    heads: list[HeadScore]
    method: dict = field(default_factory=dict)
    scores: list[list[float]] | None = None
    defaults: dict = field(default_factory=dict)
    version: int = VERSION
    # the file it was loaded from (not part of the value: equal maps compare equal)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.validate()

    # -- schema -----------------------------------------------------------------------------
    def validate(self) -> None:
        m = self.model
        if m.n_layer <= 0 or m.n_head <= 0 or m.n_head_kv <= 0:
            raise HeadmapError(f"headmap: model shape {m.n_layer}x{m.n_head} is empty")
        seen = set()
        for i, h in enumerate(self.heads):
            if not (0 <= h.layer < m.n_layer and 0 <= h.head < m.n_head):
                raise HeadmapError(
                    f"headmap: heads[{i}] = (layer {h.layer}, head {h.head}) is outside the "
                    f"model ({m.n_layer} layers x {m.n_head} heads)"
                )
            if (h.layer, h.head) in seen:
                raise HeadmapError(f"headmap: heads[{i}] repeats (layer {h.layer}, head {h.head})")
            if not math.isfinite(h.score):
                raise HeadmapError(f"headmap: heads[{i}].score is not finite")
            seen.add((h.layer, h.head))
        if any(a.score < b.score for a, b in zip(self.heads, self.heads[1:], strict=False)):
            raise HeadmapError("headmap: 'heads' must be sorted best first (score descending)")
        if self.scores is not None:
            s = np.asarray(self.scores, dtype=float)
            if s.shape != (m.n_layer, m.n_head) or not np.all(np.isfinite(s)):
                raise HeadmapError(
                    f"headmap: 'scores' must be a finite {m.n_layer} x {m.n_head} matrix, "
                    f"got shape {s.shape}"
                )

    @classmethod
    def from_json(cls, data: dict | str) -> Headmap:
        if isinstance(data, str):
            data = json.loads(data)
        if _is_ranking(data):
            raise NotAHeadmap("this JSON")
        v = _need(data, "version", int, "")
        if v != VERSION:
            raise HeadmapError(
                f"headmap: version {v} is not supported (this llama-steer reads {VERSION})"
            )
        m = _need(data, "model", dict, "")
        model = ModelIdentity(
            architecture=_need(m, "architecture", str, "model."),
            n_layer=_need(m, "n_layer", int, "model."),
            n_head=_need(m, "n_head", int, "model."),
            n_head_kv=_need(m, "n_head_kv", int, "model."),
            fingerprint=m.get("fingerprint", ""),
            name=m.get("name", ""),
        )
        if not isinstance(model.fingerprint, (str, type(None))):
            raise HeadmapError(
                f"headmap: key model.'fingerprint' must be str or null, got {model.fingerprint!r}"
            )
        heads = []
        for i, h in enumerate(_need(data, "heads", list, "")):
            where = f"heads[{i}]."
            heads.append(
                HeadScore(
                    _need(h, "layer", int, where),
                    _need(h, "head", int, where),
                    float(_need(h, "score", (int, float), where)),
                )
            )
        return cls(
            model=model,
            heads=heads,
            method=data.get("method") or {},
            scores=data.get("scores"),
            defaults=_check_defaults(data.get("defaults") or {}),
            version=v,
        )

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "model": asdict(self.model),
            "method": self.method,
            "heads": [asdict(h) for h in self.heads],
            "scores": self.scores,
            "defaults": self.defaults,
        }

    @classmethod
    def load(cls, path: str | Path) -> Headmap:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise HeadmapError(f"cannot read headmap {path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise HeadmapError(f"headmap {path} is not JSON: {e}") from None
        if _is_ranking(data):
            raise NotAHeadmap(path)
        hm = cls.from_json(data)
        hm.source = str(path)
        return hm

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def recommended(self) -> dict:
        """How to steer with this headmap: ``defaults`` over ``RECOMMENDED``.

        >>> rec = Headmap.load("headmaps/organism.json").recommended()
        >>> rec["strength"], rec["top_k"]          # (12.0, 20)
        >>> Steering(headmap=hm, roi=Panel(3, 6), **rec)
        """
        return {**RECOMMENDED, **self.defaults}

    # -- head sets --------------------------------------------------------------------------
    def top(self, k: int) -> list[tuple[int, int]]:
        if not self.heads:
            raise HeadmapError(
                "this headmap lists no heads ('heads' is empty): regenerate it with "
                "`llama-steer score ... -o FILE`, or convert a ranking with "
                "scripts/convert_headmap.py"
            )
        if not isinstance(k, int) or not 1 <= k <= len(self.heads):
            raise HeadmapError(
                f"top_k={k!r}: choose 1..{len(self.heads)} (heads listed in this headmap)"
            )
        return [(h.layer, h.head) for h in self.heads[:k]]

    def bottom(self, k: int) -> list[tuple[int, int]]:
        """The k lowest-scored heads of the full matrix (or of the ranked list)."""
        self._check_k(k)
        return [(h.layer, h.head) for h in self._all_ranked()[-k:]]

    def random(
        self, k: int, seed: int = 0, exclude_top: int | None = None
    ) -> list[tuple[int, int]]:
        """k heads drawn at random (seeded) from those outside the top ``exclude_top``
        (default: k), the paper's "random heads" control."""
        self._check_k(k)
        ranked = self._all_ranked()
        skip = {(h.layer, h.head) for h in ranked[: (k if exclude_top is None else exclude_top)]}
        pool = [(h.layer, h.head) for h in ranked if (h.layer, h.head) not in skip]
        if len(pool) < k:
            raise HeadmapError(f"only {len(pool)} heads outside the top set: cannot draw {k}")
        rng = np.random.default_rng(seed)
        return [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]

    def _all_ranked(self) -> list[HeadScore]:
        if self.scores is None:
            return list(self.heads)
        s = np.asarray(self.scores, dtype=float)
        order = np.argsort(-s, axis=None, kind="stable")
        L, H = s.shape
        return [HeadScore(int(i // H), int(i % H), float(s.flat[i])) for i in order]

    def _check_k(self, k: int) -> None:
        n = len(self._all_ranked())
        if not isinstance(k, int) or not 1 <= k <= n:
            raise HeadmapError(f"top_k={k!r}: choose 1..{n} (heads in this headmap)")

    # -- model check ------------------------------------------------------------------------
    def check_shape(self, other: ModelIdentity, what: str = "the model") -> None:
        """Refuse a model (``what`` names it) whose n_layer/n_head differ from the map's."""
        m = self.model
        if (m.n_layer, m.n_head) != (other.n_layer, other.n_head):
            raise HeadmapError(
                f"this headmap is for a model with {m.n_layer} layers x {m.n_head} heads "
                f"({m.architecture}{', ' + m.name if m.name else ''}), but {what} has "
                f"{other.n_layer} x {other.n_head} ({other.architecture}): score heads for "
                "this model with `llama-steer score`, or convert a headmap made for it"
            )

    def check_model(self, gguf: str | Path, strict: bool = True) -> list[str]:
        """Refuse a headmap whose n_layer/n_head differ from the GGUF's; return warnings
        (a different fingerprint: same shape, other weights; without a fingerprint, another
        architecture). ``strict`` turns those into errors too. A map without a fingerprint
        whose architecture and shape agree matches without a warning."""
        other = ModelIdentity.of_gguf(gguf)
        m = self.model
        self.check_shape(other, str(gguf))
        warnings = []
        if m.fingerprint and m.fingerprint != other.fingerprint:
            msg = (
                f"this headmap was scored on a different GGUF of the same shape "
                f"(fingerprint {m.fingerprint[:12]}... vs {other.fingerprint[:12]}...): "
                "heads may not transfer"
            )
            if strict:
                raise HeadmapError(msg + "; pass strict=False to use it anyway")
            warnings.append(msg)
        if not m.fingerprint and m.architecture != other.architecture:
            msg = (
                f"this headmap is for a {m.architecture} model"
                f"{' (' + m.name + ')' if m.name else ''} of the same shape, but {gguf} is "
                f"{other.architecture}: heads may not transfer"
            )
            if strict:
                raise HeadmapError(msg + "; pass strict=False to use it anyway")
            warnings.append(msg)
        return warnings


def _is_ranking(data) -> bool:
    """A ranking in the gaze-heads code's shape: a list of heads, or {"heads": [...]} without
    a version (what convert() reads; a headmap is an object with a version)."""
    if isinstance(data, list):
        return True
    return isinstance(data, dict) and "heads" in data and not {"version", "model"} & set(data)


# -- conversion ----------------------------------------------------------------------------
def _check_shape(have: ModelIdentity, want: ModelIdentity, path) -> None:
    if (have.n_layer, have.n_head) != (want.n_layer, want.n_head):
        raise HeadmapError(
            f"{path} is for a model with {have.n_layer} layers x {have.n_head} heads, not "
            f"{want.n_layer} x {want.n_head}"
        )


def _read_ranked(path: Path) -> tuple[list[tuple[int, int, float]], np.ndarray | None]:
    """(layer, head, score) triples from a ranking file, or a score matrix from .npy."""
    import csv
    import re

    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            m = np.load(path)
        except (ValueError, OSError, EOFError) as e:
            raise HeadmapError(f"{path} is not a readable .npy array ({e})") from None
        if not isinstance(m, np.ndarray) or not np.issubdtype(m.dtype, np.number):
            raise HeadmapError(f"{path}: a score matrix must be a numeric 2-D array")
        if m.ndim != 2 or not np.all(np.isfinite(m)):
            raise HeadmapError(
                f"{path}: a score matrix must be a finite 2-D array (layers x heads)"
            )
        return [], m.astype(float)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise HeadmapError(
            f"{path} is not text: expected a ranking JSON list of {{layer, head, score}}, a "
            "CSV, L20H3-style names, or a .npy matrix"
        ) from None
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or not {"layer", "head"} <= set(rows[0]):
            raise HeadmapError(f"{path}: a CSV needs a header with layer,head[,score]")
        out = []
        for i, r in enumerate(rows, 2):
            try:
                score = float(r["score"]) if r.get("score") not in (None, "") else None
                out.append((int(r["layer"]), int(r["head"]), score))
            except ValueError:
                raise HeadmapError(f"{path}:{i}: layer/head/score must be numbers") from None
        return out, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "heads" in data and "version" not in data:
        data = data["heads"]
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        out = []
        for i, x in enumerate(data):
            score = x.get("score", x.get("gaze_score"))
            try:
                out.append(
                    (int(x["layer"]), int(x["head"]), None if score is None else float(score))
                )
            except (KeyError, TypeError, ValueError):
                raise HeadmapError(f"{path}: item {i} needs integer 'layer' and 'head'") from None
        return out, None
    items = data if isinstance(data, list) else re.split(r"[\s,]+", text.strip())
    out = []
    for item in items:
        m = re.fullmatch(r"[lL](\d+)[hH](\d+)", str(item).strip())
        if not m:
            raise HeadmapError(
                f"{path}: cannot read {item!r}; expected a ranking JSON list of "
                "{layer, head, score}, a CSV, L20H3-style names, or a .npy matrix"
            )
        out.append((int(m.group(1)), int(m.group(2)), None))
    return out, None


def convert(
    source: str | Path,
    model: str | Path | ModelIdentity | None = None,
    top_k: int | None = None,
    merge: str | Path | None = None,
    method: dict | None = None,
) -> Headmap:
    """A Headmap from another format (see scripts/convert_headmap.py), checked against
    ``model`` when given (required for lists, whose files do not name the model): a GGUF
    path, or a ModelIdentity for a model not at hand (its shape and name, no fingerprint:
    the map then matches models by architecture and shape). ``method`` entries are recorded
    in the map's method block (attribution: name, source, ...)."""
    path = Path(source)
    if not path.exists():
        raise HeadmapError(f"{path}: no such file")
    if path.is_dir():
        raise HeadmapError(f"{path} is a directory: pass the ranking file")
    ident = None
    if isinstance(model, ModelIdentity):
        ident, model = model, None
    elif model is not None:
        ident = ModelIdentity.of_gguf(model)
    try:
        head = path.read_bytes()[:200].decode("utf-8", "replace")
    except OSError as e:
        raise HeadmapError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix.lower() == ".json" and '"version"' in head:
        hm = Headmap.load(path)
        if model is not None:
            hm.check_model(model, strict=False)
        if ident is not None:
            _check_shape(hm.model, ident, path)
            hm = Headmap(ident, hm.heads, hm.method, hm.scores, hm.defaults)
        if method:
            hm = Headmap(hm.model, hm.heads, dict(hm.method, **method), hm.scores, hm.defaults)
    else:
        triples, matrix = _read_ranked(path)
        if matrix is not None:
            if ident is None:
                raise HeadmapError(
                    f"{path}: pass --model model.gguf (the GGUF it scores), or its shape "
                    "(--arch, --n-layer, --n-head, --n-head-kv)"
                )
            if matrix.shape != (ident.n_layer, ident.n_head):
                raise HeadmapError(
                    f"{path}: matrix is {matrix.shape[0]} x {matrix.shape[1]} but "
                    f"{model or ident.name or ident.architecture} has "
                    f"{ident.n_layer} layers x {ident.n_head} heads"
                )
            order = np.argsort(-matrix, axis=None, kind="stable")
            H = matrix.shape[1]
            heads = [HeadScore(int(i // H), int(i % H), float(matrix.flat[i])) for i in order]
            scores = matrix.tolist()
        else:
            if ident is None:
                raise HeadmapError(
                    f"{path} does not say which model it is for: pass --model model.gguf, or "
                    "its shape without the GGUF (--arch, --n-layer, --n-head, --n-head-kv, "
                    "--name)"
                )
            if not triples:
                raise HeadmapError(f"{path}: no heads in it")
            n = len(triples)
            # unscored lists are ranked: score by rank (1 for the best, down to 1/n)
            full = [
                (ly, hd, s if s is not None else (n - i) / n)
                for i, (ly, hd, s) in enumerate(triples)
            ]
            full.sort(key=lambda t: -t[2])
            heads = [HeadScore(ly, hd, float(s)) for ly, hd, s in full]
            scores = None
        hm = Headmap(
            ident,
            heads,
            dict(method or {}, converted_from=path.name),
            scores,
            {"top_k": min(10, len(heads)), "mode": "redirect", "strength": 8.0},
        )
    if merge is not None:
        # a ranking to merge names no model: it is for the first map's (the same shape)
        other = convert(merge, model=model if model is not None else hm.model)
        if (other.model.n_layer, other.model.n_head) != (hm.model.n_layer, hm.model.n_head):
            raise HeadmapError(f"cannot merge {merge}: it is for another model shape")

        def norm(h: Headmap) -> dict:
            top = max((abs(x.score) for x in h.heads), default=1.0) or 1.0
            return {(x.layer, x.head): x.score / top for x in h.heads}

        a, b = norm(hm), norm(other)
        keys = set(a) | set(b)
        merged = sorted(
            ((k, (a.get(k, 0.0) + b.get(k, 0.0)) / 2) for k in keys), key=lambda t: -t[1]
        )
        hm = Headmap(
            hm.model,
            [HeadScore(k[0], k[1], s) for k, s in merged],
            dict(hm.method, merged_with=Path(merge).name),
            None,
            hm.defaults,
        )
    if top_k is not None:
        if not 1 <= top_k <= len(hm.heads):
            raise HeadmapError(f"--top-k {top_k}: the map has {len(hm.heads)} heads")
        hm = Headmap(
            hm.model, hm.heads[:top_k], hm.method, hm.scores, dict(hm.defaults, top_k=top_k)
        )
    return hm


# -- the registry: which headmap goes with a model -----------------------------------------
HEADMAPS_ENV = "LLAMA_STEER_HEADMAPS"


def headmap_dirs() -> list[Path]:
    """Where headmaps are looked up, in order: the shipped ones (the package's copy of the
    repository's headmaps/, or headmaps/ itself in a checkout), then the user's directory
    ($LLAMA_STEER_HEADMAPS, default ~/.cache/llama-steer/headmaps)."""
    here = Path(__file__).resolve().parent
    shipped = [here / "headmaps", here.parents[1] / "headmaps"]
    user = os.environ.get(HEADMAPS_ENV) or str(Path.home() / ".cache" / "llama-steer" / "headmaps")
    seen, out = set(), []
    for d in [*shipped, Path(user).expanduser()]:
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


_CANDIDATES: dict[Path, tuple[tuple[int, int], Headmap | None]] = {}


def _candidate(path: Path) -> Headmap | None:
    """The headmap in ``path``, parsed once per version of the file: every update() of a
    Steering resolves its defaults, which looks the model's map up (a server does it twice a
    request), and parsing the shipped maps took ~2 ms each time."""
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CANDIDATES.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        hm = Headmap.load(path)
    except HeadmapError:
        hm = None
    _CANDIDATES[path] = (stamp, hm)
    return hm


def find_headmap(model: ModelIdentity) -> tuple[Headmap, Path] | None:
    """The headmap for ``model``: one scored on this very GGUF (same fingerprint) first, else
    one made without a GGUF (no fingerprint: a converted ranking) whose architecture and shape
    agree, a name match preferred; shipped maps before the user's. A map of the same shape
    scored on other weights is never picked by itself (its heads may not transfer).

    >>> found = find_headmap(ModelIdentity.of_gguf("Qwen3-VL-2B-Instruct-Q4_K_M.gguf"))
    >>> found[1].name                                   # 'qwen3vl-2b.json'
    """
    shape = (model.architecture, model.n_layer, model.n_head, model.n_head_kv)
    exact, by_shape = [], []
    for d in headmap_dirs():
        for p in sorted(d.glob("*.json")):
            if p.name.endswith(".report.json"):
                continue
            hm = _candidate(p)
            if hm is None:
                continue  # not a headmap (a report, a raw ranking): not a candidate
            m = hm.model
            if (m.architecture, m.n_layer, m.n_head, m.n_head_kv) != shape or not hm.heads:
                continue
            if m.fingerprint and m.fingerprint == model.fingerprint:
                exact.append((hm, p))
            elif not m.fingerprint:
                by_shape.append((hm, p))
    if exact:
        return exact[0]
    named = [c for c in by_shape if model.name and c[0].model.name == model.name]
    return (named or by_shape or [None])[0]
