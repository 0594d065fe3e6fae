"""Organism v2's data (llama_steer.comics, v2 section): layouts, free sizes, styles, three
renderers with the held-out one kept out of training -- and v1's outputs unchanged.

numpy + Pillow only (no torch)."""

import hashlib

import numpy as np
import pytest

from llama_steer import comics as c

# v1 renders / examples / labels, hashed before the v2 additions (sha256 of the pixel bytes,
# first 16 hex digits): the v2 code must not move one pixel of them.
V1_HASHES = {
    "ex/describe/3": "93da62900931bfbd",
    "ex/describe/4": "10b605bd8cd20237",
    "ex/panel_number/3": "a2a643e27100a91e",
    "ex/panel_number/4": "bfa3ba937af94bd5",
    "ex/panel_ordinal/3": "31e0c6a4a7ca7b51",
    "ex/panel_ordinal/4": "4e58da5d13e11494",
    "ex/scene_list/3": "d52593ecc1adcd66",
    "ex/scene_list/4": "e544c642a320be52",
    "ex/scene_region/3": "2010820e6a42ff00",
    "ex/scene_region/4": "7438d9fb3ae8e0e6",
    "ex/scene_yesno/3": "d472bdbea7a1e1dd",
    "ex/scene_yesno/4": "1c85e8d52e460acb",
    "ex/this_panel/3": "bc124d3d7b6affae",
    "ex/this_panel/4": "af18950c8e9fd33c",
    "labels/1x6/11": "4ea4b97103de736b",
    "scene/numpy/0": "ab0324e6b2326c62",
    "scene/numpy/2000000001": "f0c4cd51ef1522bb",
    "scene/numpy/5": "3d35da1b0ef21e70",
    "scene/numpy/999": "02330c8c55a2e773",
    "scene/pillow/0": "320a3bc31b4c0c1c",
    "scene/pillow/2000000001": "79cafa69142b0d25",
    "scene/pillow/5": "3f07385e79d3268c",
    "scene/pillow/999": "3bb602261d410002",
    "strip/numpy/1x6/0": "8ff290aca9bd3c77",
    "strip/numpy/1x6/1": "f2a0b21211c7ccd5",
    "strip/numpy/1x6/1000000003": "2dd9e19ea107fd88",
    "strip/numpy/1x6/12345": "1f4f8bfde2792294",
    "strip/numpy/1x6/7": "112f78b53674c41d",
    "strip/numpy/2x3/0": "c293d5e4fd070b37",
    "strip/numpy/2x3/1": "4bf263286f6c1a4b",
    "strip/numpy/2x3/1000000003": "eb6befc3df30c60a",
    "strip/numpy/2x3/12345": "3990814f429933f8",
    "strip/numpy/2x3/7": "bb91b3c19e8a86eb",
    "strip/pillow/1x6/0": "342b5e4000b7facf",
    "strip/pillow/1x6/1": "0834f869a071fe33",
    "strip/pillow/1x6/1000000003": "b27948771243c4bd",
    "strip/pillow/1x6/12345": "a1717d64edc3776f",
    "strip/pillow/1x6/7": "8bf1915cb5458daa",
    "strip/pillow/2x3/0": "d3151b19ddf9a2d7",
    "strip/pillow/2x3/1": "ef40eabc3773d74f",
    "strip/pillow/2x3/1000000003": "1fa4c20156c14c5d",
    "strip/pillow/2x3/12345": "4ae1a451fb1f4d3c",
    "strip/pillow/2x3/7": "dbeae55a5d693ada",
}


def _v1_hashes():
    h = {}
    for r in ("pillow", "numpy"):
        for lay in ("1x6", "2x3"):
            for s in (0, 1, 7, 12345, 10**9 + 3):
                img = c.render(c.make_strip(s, lay), r)
                h[f"strip/{r}/{lay}/{s}"] = hashlib.sha256(img.tobytes()).hexdigest()[:16]
        for s in (0, 5, 999, 2 * 10**9 + 1):
            img = c.render(c.make_scene(s), r)
            h[f"scene/{r}/{s}"] = hashlib.sha256(img.tobytes()).hexdigest()[:16]
    for t in c.TASKS:
        for s in (3, 4):
            ex = c.make_example(s, t, "numpy")
            blob = ex.image.tobytes() + (ex.question + "|" + ex.answer).encode()
            h[f"ex/{t}/{s}"] = hashlib.sha256(blob).hexdigest()[:16]
    lab = c.token_labels(c.make_strip(11, "1x6"))
    h["labels/1x6/11"] = hashlib.sha256(b"".join(v.tobytes() for v in lab.values())).hexdigest()[
        :16
    ]
    return h


def test_v1_outputs_unchanged():
    assert _v1_hashes() == V1_HASHES
    assert c.LAYOUTS == {"1x6": (1, 6), "2x3": (2, 3)}


def test_split_is_explicit():
    assert set(c.TRAIN_RENDERERS).isdisjoint(c.HELDOUT_RENDERERS)
    assert len(c.TRAIN_RENDERERS) >= 2 and c.HELDOUT_RENDERERS
    for r in c.TRAIN_RENDERERS:
        c.check_training(r)
    for r in c.HELDOUT_RENDERERS:
        with pytest.raises(ValueError):
            c.check_training(r)
    with pytest.raises(ValueError):
        c.check_training(c.TRAIN_RENDERERS[0], "heldout")


@pytest.mark.parametrize("renderer", c.RENDERERS_V2)
def test_deterministic_per_seed(renderer):
    for s in (0, 1, 2, 3, 17):
        for kind in ("strip", "scene"):
            a = c.render_v2(c.make_desc_v2(s, kind), renderer)
            b = c.render_v2(c.make_desc_v2(s, kind), renderer)
            assert a.tobytes() == b.tobytes()
    x = c.render_v2(c.make_desc_v2(4, "strip", layout="2x3"), renderer)
    y = c.render_v2(c.make_desc_v2(5, "strip", layout="2x3"), renderer)
    assert x.tobytes() != y.tobytes()


def test_heldout_renderer_differs():
    for s in range(6):
        desc = c.make_desc_v2(s, "strip" if s % 2 else "scene")
        imgs = {r: np.asarray(c.render_v2(desc, r), np.float32) for r in c.RENDERERS_V2}
        for h in c.HELDOUT_RENDERERS:
            for t in c.TRAIN_RENDERERS:
                assert imgs[h].shape == imgs[t].shape
                assert (np.abs(imgs[h] - imgs[t]).max(-1) > 3).mean() > 0.02, (s, h, t)


@pytest.mark.parametrize("layout", list(c.LAYOUTS_V2))
@pytest.mark.parametrize("sizes", c.SIZES)
def test_panel_boxes_tile_the_image(layout, sizes):
    rows, cols = c.LAYOUTS_V2[layout]
    for s in range(8):
        st = c.make_strip_v2(s, layout, sizes)
        w, h = st.size
        cover = np.zeros((h, w), np.int32)
        for p in st.panels:
            x0, y0, x1, y1 = p.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            cover[y0:y1, x0:x1] += 1
            t = p.thing  # the thing lies inside its panel
            assert x0 <= t.cx - t.size / 2 and t.cx + t.size / 2 <= x1
            assert y0 <= t.cy - t.size / 2 and t.cy + t.size / 2 <= y1
        assert (cover == 1).all()
        assert [p.index for p in st.panels] == list(range(1, 7))
        # reading order: left to right, then top to bottom
        assert sorted(st.panels, key=lambda p: (p.box[1], p.box[0])) == list(st.panels)
        assert len({p.box[0] for p in st.panels}) == cols
        assert len({p.box[1] for p in st.panels}) == rows


def test_sizes_train_vs_heldout():
    lo, hi = c.PANEL_HELDOUT
    multiples = 0
    for s in range(40):
        st = c.make_strip_v2(s, "2x3", "train")
        sides = [p.box[2] - p.box[0] for p in st.panels] + [p.box[3] - p.box[1] for p in st.panels]
        assert all(not lo <= v < hi for v in sides)
        multiples += all(v % 32 == 0 for v in sides)
        ho = c.make_strip_v2(s, "2x3", "heldout")
        hsides = [p.box[2] - p.box[0] for p in ho.panels] + [p.box[3] - p.box[1] for p in ho.panels]
        assert any(lo <= v < hi for v in hsides)
        sc = c.make_scene_v2(s, "train")
        assert all(not c.SCENE_HELDOUT[0] <= v < c.SCENE_HELDOUT[1] for v in sc.size)
        assert any(
            c.SCENE_HELDOUT[0] <= v < c.SCENE_HELDOUT[1] for v in c.make_scene_v2(s, "heldout").size
        )
    assert multiples == 0


def test_styles_vary():
    looks = [c.make_strip_v2(s, "1x6").look for s in range(60)]
    assert {lk.border_width > 0 for lk in looks} == {True, False}
    assert {lk.antialias for lk in looks} == {True, False}
    assert any(lk.blur > 0 for lk in looks) and any(lk.jpeg > 0 for lk in looks)
    kinds = {p.backdrop.kind for s in range(20) for p in c.make_strip_v2(s, "2x3").panels}
    assert kinds == set(c.BACKDROPS)


def test_mtmd_geometry_and_labels():
    assert c.mtmd_geometry(320, 200)[:2] == (320, 192)  # as mtmd (nx=10, ny=6)
    assert c.mtmd_geometry(320, 192) == (320, 192, 320, 192, 0, 0)
    for s in range(6):
        for kind in ("strip", "scene"):
            d = c.make_desc_v2(s, kind)
            tw, th, nw, nh, ox, oy = c.mtmd_geometry(*d.size)
            assert tw % 32 == 0 and th % 32 == 0 and nw <= tw and nh <= th
            img = c.mtmd_resize(c.render_v2(d, "pillow"))
            assert img.size == (tw, th)
            lab = c.token_labels_v2(d)
            gy, gx = lab["grid"]
            assert (gy * 32, gx * 32) == (th, tw)
            for k in ("colour", "shape", "slot"):
                assert lab[k].shape == (gy * gx,)
            if kind == "strip":
                assert set(range(1, 7)) <= set(lab["slot"].tolist())
                assert lab["colour"].any()
            else:
                assert set(lab["slot"].tolist()) - {0} <= {7, 8, 9, 10}


@pytest.mark.parametrize("renderer", c.RENDERERS_V2)
def test_things_drawn_where_described(renderer):
    """At a large square's or circle's centre every renderer shows roughly its colour."""
    checked = 0
    for s in range(40):
        d = c.make_strip_v2(s, "2x3")
        img = np.asarray(c.render_v2(d, renderer), np.float32)
        for p in d.panels:
            t = p.thing
            if t.shape in ("square", "circle") and t.size > 30:
                px = img[int(t.cy), int(t.cx)]
                assert np.abs(px - np.array(c._RGB[t.colour])).max() < 70, (s, p.index, px)
                checked += 1
    assert checked > 10


def test_examples_v2():
    for s in range(8):
        for task in c.TASKS:
            ex = c.make_example_v2(s, task, "sdf", "heldout")
            assert ex.question and ex.answer
            if task == "this_panel":
                assert ex.answer == ex.desc.panels[0].thing.name


def test_mtmd_geometry_agrees_with_llama_steer_vision():
    """comics' copy of mtmd's resize rule (used for training labels) and llama-steer's (used
    for ROIs) give the same canvas and letterbox for Qwen3-VL's 32-px tokens."""
    from llama_steer.vision import Geometry

    geo = Geometry("qwen3vl_merger", 16, 2, 8, 4096)
    rng = np.random.default_rng(0)
    sizes = [(320, 200), (550, 107), (71, 695), (64, 64), (40, 40), (3000, 2900)]
    sizes += [tuple(int(v) for v in rng.integers(30, 900, 2)) for _ in range(300)]
    for w, h in sizes:
        g = geo.grid(w, h)
        tw, th, nw, nh, ox, oy = c.mtmd_geometry(w, h)
        assert (tw, th) == (g.nx * 32, g.ny * 32), (w, h)
        if (nw, nh) != (tw, th) or (w, h) != (tw, th):
            assert (ox, oy, nw, nh) == g.content, (w, h)


def test_every_training_renderer_draws_every_layout():
    seen = {(c.pick_renderer(s), list(c.LAYOUTS_V2)[s % 4]) for s in range(200)}
    assert seen == {(r, lay) for r in c.TRAIN_RENDERERS for lay in c.LAYOUTS_V2}
    assert {c.pick_renderer(s, c.HELDOUT_RENDERERS) for s in range(10)} == set(c.HELDOUT_RENDERERS)
