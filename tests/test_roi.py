"""ROI grammar, image token grids and pixel -> token mapping, against hand-computed grids."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_steer import (
    Box,
    ImageTokens,
    Panel,
    Region,
    Saliency,
    Steering,
    SteeringConfig,
    SteeringError,
    Text,
    parse_roi,
)
from llama_steer.roi import RoiError, Seq, domain_of, focus_content, resolve
from llama_steer.vision import Geometry, ImageSpan, content_tokens

QWEN2VL = Geometry("qwen2vl_merger", patch_size=14, merge=2, min_tokens=8, max_tokens=4096)


@pytest.mark.parametrize(
    "size,grid,content",
    [
        ((252, 168), (9, 6), (0, 0, 252, 168)),  # 2x3 strip of 84 px panels
        ((504, 84), (18, 3), (0, 0, 504, 84)),  # 1x6 strip
        ((224, 224), (8, 8), (0, 0, 224, 224)),  # scene
        # 500x90: canvas 504x84 (round to 28), fitted 467x84, centred 18 px from the left
        ((500, 90), (18, 3), (18, 0, 467, 84)),
        # 50x50: 2x2 tokens < 8 minimum -> scaled up to 84x84
        ((50, 50), (3, 3), (0, 0, 84, 84)),
        # 1000x200: 36x7 canvas 1008x196, fitted 980x196, 14 px each side
        ((1000, 200), (36, 7), (14, 0, 980, 196)),
    ],
)
def test_grids_match_hand_computation(size, grid, content):
    g = QWEN2VL.grid(*size)
    assert (g.nx, g.ny) == grid
    assert g.content == content


def test_box_panel_region_tokens_hand_computed():
    g = QWEN2VL.grid(252, 168)  # 9x6, 28 px tokens
    np.testing.assert_array_equal(g.box_tokens(28, 28, 84, 84), [10, 11, 19, 20])
    np.testing.assert_array_equal(g.box_tokens(0, 0, 15, 28), [0])  # 15/28 >= half
    np.testing.assert_array_equal(g.box_tokens(0, 0, 13, 28), [0])  # < half: centre token
    np.testing.assert_array_equal(g.box_tokens(30, 60, 31, 61), [19])  # centre rule
    span = ImageSpan(1, g, first_cell=15, first_pos=15, n_pos=9)
    seq = Seq([0] * 30, [b""] * 30, np.arange(30), [span])
    cells, w = resolve((Panel(4, grid=(2, 3)),), seq)
    np.testing.assert_array_equal(cells - 15, [27, 28, 29, 36, 37, 38, 45, 46, 47])
    assert w is None
    cells, _ = resolve((Region("top-left"),), seq)
    # top-left = x < 126, y < 84: cols 0-3 fully, col 4 half (112..140: 14/28 = half) -> 0-4
    np.testing.assert_array_equal(
        cells - 15, [0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 18, 19, 20, 21, 22]
    )
    strip = ImageSpan(1, QWEN2VL.grid(504, 84), 0, 0, 18)
    seq = Seq([0] * 18, [b""] * 18, np.arange(18), [strip])
    cells, _ = resolve((Panel(2, of=6),), seq)
    np.testing.assert_array_equal(cells, [3, 4, 5, 21, 22, 23, 39, 40, 41])
    np.testing.assert_array_equal(domain_of((Panel(2, of=6),), seq), np.arange(54))


def test_letterboxed_tokens_map_to_original_pixels():
    g = QWEN2VL.grid(500, 90)  # content starts 18 canvas px in, scale 467/500
    tb = g.token_boxes()
    assert tb[0, 0] == 0 and tb[0, 2] == pytest.approx((28 - 18) * 500 / 467)
    assert tb[17, 2] == 500  # the last column is clipped at the image's right edge
    # a 5 px sliver is under half of token 0's 10.7 px: the centre rule picks row 1's token
    np.testing.assert_array_equal(g.box_tokens(0, 0, 5, 90), [18])
    left_panel = g.box_tokens(0, 0, 500 / 6, 90)
    assert set(left_panel.tolist()) >= {1, 2, 19, 20, 37, 38}


def test_grammar():
    assert parse_roi("50:99") == (ImageTokens(50, 99),)
    assert parse_roi("3:7,20:25") == (ImageTokens(3, 7), ImageTokens(20, 25))
    assert parse_roi("box:120,40,260,200") == (Box(120, 40, 260, 200),)
    assert parse_roi("panel:4/6") == (Panel(4, of=6),)
    assert parse_roi("panel:5@2x3") == (Panel(5, grid=(2, 3)),)
    assert parse_roi("image2:top-left+center") == (Region("top-left", image=2), Region("center"))
    assert parse_roi('text:"a+b c"+left') == (Text("a+b c"), Region("left"))
    assert parse_roi("saliency:map.npy")[0].source == "map.npy"
    assert parse_roi("7") == (ImageTokens(7, 7),)


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("", "empty roi"),
        ("99:50", "inverted"),
        ("panel:7/6", "panels are numbered 1..6"),
        ("panel:0@2x3", "numbered 1..6"),
        ("panel:3", "panel:k/n"),
        ("box:1,2,3", "box:x0,y0,x1,y1"),
        ("middle", "cannot read roi term"),
        ("image0:left", "numbered from 1"),
        ("image2:text:'x'", "belong to the prompt"),
        ('text:"open', "unterminated quote"),
        ("left+", "empty roi term"),
    ],
)
def test_grammar_errors_name_the_fix(spec, msg):
    with pytest.raises(SteeringError, match=msg):
        parse_roi(spec)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="0123456789:,+/@xboxpanelimagetextsaliency-leftrightcenter\"' ", max_size=30)
)
def test_fuzz_parser_raises_only_roi_errors(spec):
    try:
        targets = parse_roi(spec)
    except RoiError:
        return
    assert targets and all(t is not None for t in targets)


def test_out_of_grid_and_bad_boxes_name_the_grid():
    g = QWEN2VL.grid(252, 168)
    seq = Seq([0] * 20, [b""] * 20, np.arange(20), [ImageSpan(1, g, 5, 5, 9)])
    with pytest.raises(SteeringError, match=r"9x6 = 54 tokens"):
        resolve((ImageTokens(50, 60),), seq)
    with pytest.raises(SteeringError, match=r"outside the image \(252x168 px, grid 9x6"):
        resolve((Box(0, 0, 300, 10),), seq)
    with pytest.raises(SteeringError, match="empty or inverted"):
        resolve((Box(50, 10, 40, 20),), seq)
    with pytest.raises(SteeringError, match="image2 does not exist"):
        resolve((Region("left", image=2),), seq)
    with pytest.raises(SteeringError, match="holds no image"):
        resolve((Region("left"),), Seq.text_only([1, 2], [b"a", b"b"]))
    two = Seq(
        [0] * 40, [b""] * 40, np.arange(40), [ImageSpan(1, g, 0, 0, 9), ImageSpan(2, g, 54, 9, 9)]
    )
    with pytest.raises(SteeringError, match="say which one"):
        resolve((Region("left"),), two)
    cells, _ = resolve((ImageTokens(0, 0, image=2),), two)
    assert cells.tolist() == [54]


def test_saliency_is_averaged_per_token(tmp_path):
    g = QWEN2VL.grid(252, 168)
    sal = np.zeros((168, 252))
    sal[:28, :28] = 1.0  # token 0
    sal[28:56, 28:56] = 0.5  # token 10
    np.save(tmp_path / "s.npy", sal)
    seq = Seq([0] * 20, [b""] * 20, np.arange(20), [ImageSpan(1, g, 3, 3, 9)])
    cells, w = resolve((Saliency(str(tmp_path / "s.npy")),), seq)
    assert cells.size == 54 and w.size == 54
    assert w[0] == pytest.approx(1.0) and w[10] == pytest.approx(0.5) and w[1] == 0
    # a half-resolution map gives the same per-token means
    cells2, w2 = resolve((Saliency(sal[::2, ::2]),), seq)
    np.testing.assert_allclose(w2, w, atol=1e-9)
    with pytest.raises(SteeringError, match="does not exist"):
        resolve((Saliency(str(tmp_path / "nope.png")),), seq)


def _drawing(w=252, h=168, bg=(230, 225, 210)):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    return img


def test_content_focus_keeps_the_tokens_that_show_something():
    g = QWEN2VL.grid(252, 168)  # 9x6 tokens of 28 px
    img = _drawing()
    img[28:84, 84:140] = (200, 30, 30)  # a red square on tokens (1..2, 3..4)
    img[140:168, 0:3] = (20, 20, 20)  # a thin border stroke: 3/28 of a token < 15%
    panel = np.array([r * 9 + c for r in range(3) for c in range(3, 6)])
    np.testing.assert_array_equal(content_tokens(img, g, panel), [12, 13, 21, 22])
    left = np.array([r * 9 + c for r in range(3, 6) for c in range(3)])
    np.testing.assert_array_equal(content_tokens(img, g, left), left)  # nothing: all kept
    img[56:84, 168:172] = (0, 0, 255)  # 4x28 px = 14% of token 24: not enough
    img[0:28, 224:252] = (0, 0, 255)  # all of token 8
    whole = np.arange(54)
    np.testing.assert_array_equal(content_tokens(img, g, whole), [8, 12, 13, 21, 22])
    # a photo-like region without one dominant colour: nothing stands out, all kept
    noisy = np.random.default_rng(0).integers(0, 256, (168, 252, 3), dtype=np.uint8)
    np.testing.assert_array_equal(content_tokens(noisy, g, panel), panel)


def test_focus_content_narrows_image_cells_only():
    g = QWEN2VL.grid(252, 168)
    img = _drawing()
    img[28:84, 84:140] = (200, 30, 30)
    seq = Seq([0] * 70, [b""] * 70, np.arange(70), [ImageSpan(1, g, 5, 5, 9, img)])
    cells, _ = resolve(parse_roi("panel:2@2x3"), seq)
    text = np.array([0, 1, 2])
    got = focus_content(np.concatenate([text, cells]), seq)
    np.testing.assert_array_equal(got, [0, 1, 2, 5 + 12, 5 + 13, 5 + 21, 5 + 22])
    no_pixels = Seq([0] * 70, [b""] * 70, np.arange(70), [ImageSpan(1, g, 5, 5, 9)])
    np.testing.assert_array_equal(focus_content(cells, no_pixels), cells)
    # the same call again gives the same cells; another image with the same grid and cells
    # gets its own answer
    again = focus_content(np.concatenate([text, cells]), seq)
    np.testing.assert_array_equal(again, got)
    other = _drawing()
    other[84:140, 84:140] = (30, 30, 200)  # the square one token row lower
    seq2 = Seq([0] * 70, [b""] * 70, np.arange(70), [ImageSpan(1, g, 5, 5, 9, other)])
    np.testing.assert_array_equal(
        focus_content(cells, seq2), 5 + content_tokens(other, g, cells - 5)
    )
    assert not np.array_equal(focus_content(cells, seq2), got[3:])


def test_focus_is_validated():
    with pytest.raises(SteeringError, match="focus='edges' is not one of"):
        Steering(roi=Panel(1, of=6), focus="edges")
    with pytest.raises(SteeringError, match="use one or the other"):
        Steering(roi=Panel(1, of=6), mode="bias", weights=np.ones(9), focus="content")
    assert "focus='content'" in repr(Steering(roi=Panel(1, of=6), focus="content"))


def test_show_grid_marks_the_roi_and_its_focus(organism, tmp_path):
    import io

    from PIL import Image

    from llama_steer.apps.cli import show_grid

    img = _drawing()
    img[28:84, 84:140] = (200, 30, 30)  # tokens 12, 13, 21, 22: inside panel 2 of 2x3
    Image.fromarray(img).save(tmp_path / "s.png")
    out = io.StringIO()
    roi, png = "panel:2@2x3", [str(tmp_path / "s.png")]
    show_grid(organism[1], png, roi, SteeringConfig(roi=roi).resolve(), out=out)
    assert "9 tokens: [3, 4, 5, 12, 13, 14, 21, 22, 23]" in out.getvalue()
    out = io.StringIO()
    show_grid(organism[1], png, roi, SteeringConfig(roi=roi, focus="content").resolve(), out=out)
    assert "4 tokens: [12, 13, 21, 22]" in out.getvalue()
    assert "      9 ...##...." in out.getvalue()
