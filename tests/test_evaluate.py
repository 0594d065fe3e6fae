"""Judges, head sets, schedules, POPE scoring, and a small end-to-end eval on the VLM."""

import json

import numpy as np
import pytest
from conftest import run_cli

from llama_steer import SteeringError, comics
from llama_steer.apps.evaluate import (
    _derangement,
    _pope_scores,
    caption_judge,
    head_sets,
    judge_schedule,
    objects_in,
    pope_questions,
    well_formed,
)
from llama_steer.headmap import Headmap, HeadScore, ModelIdentity


def test_exact_judge_reads_the_vocabulary():
    assert objects_in("a red circle, then a Blue square.") == ["a red circle", "a blue square"]
    assert objects_in("a purple star star star") == ["a purple star"]
    assert objects_in("nothing here, a reddish circle") == []


def test_caption_overlap_judge():
    caps = ["a dog runs on the beach", "two cats sleep", "a red car"]
    assert caption_judge("The cats sleep.", caps) == 2
    assert caption_judge("a car, red", caps) == 3
    assert caption_judge("zebra", caps) == 0


def test_head_sets_from_a_headmap():
    s = np.arange(24, dtype=float).reshape(6, 4)
    order = np.argsort(-s, axis=None)
    hm = Headmap(
        ModelIdentity("qwen2vl", 6, 4, 2),
        [HeadScore(int(i // 4), int(i % 4), float(s.flat[i])) for i in order],
        scores=s.tolist(),
    )
    sets = head_sets("top:3,random:3,bottom:3,all", hm, seed=0)
    assert sets["top:3"] == [(5, 3), (5, 2), (5, 1)]
    assert sets["bottom:3"] == [(0, 2), (0, 1), (0, 0)]
    assert not set(sets["random:3"]) & set(sets["top:3"]) and sets["all"] == "all"
    with pytest.raises(SteeringError, match="top:K"):
        head_sets("best:3", hm)
    with pytest.raises(SteeringError, match="needs --headmap"):
        head_sets("top:3", None)


def test_derangements_move_every_panel():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = _derangement(rng)
        assert sorted(p) == [1, 2, 3, 4, 5, 6] and all(p[i] != i + 1 for i in range(6))


def test_schedule_judge_ranks_only_objects_the_strip_holds():
    """Two-token segments: panel 2, then 1, then 3. The narration names panel 2's object,
    then one the strip does not hold, then panel 3's: segment 2 is a miss, and the
    unknown object gets no rank (as panel 0 it would have broken a perfect ordering)."""
    panels = {"a red circle": 1, "a blue square": 2, "a green star": 3}
    pieces = ["a blue square,", " then", " a black cross,", " then", " a green star", "."]
    targets = [2, 2, 1, 1, 3, 3]
    hits, described = judge_schedule(pieces, targets, [2, 1, 3], panels, every=2)
    assert hits == [1.0, 0.0, 1.0]
    assert described == [(2, 2), (3, 3)]
    # the lag allowance: an object finished up to 3 tokens into the next segment counts
    hits, _ = judge_schedule(["a", " red", " circle", "."], [1, 1, 2, 2], [1, 2], panels, 2)
    assert hits[0] == 1.0


def test_scene_object_counts_and_lists():
    counts = {len(comics.make_scene(i).things) for i in range(60)}
    assert counts == {2, 3, 4}
    one = comics.make_scene(5, n_things=(1, 1))
    assert len(one.things) == 1 and comics.describe(one) == one.things[0].name
    four = comics.make_scene(5, n_things=(4, 4))
    names = [t.name for t in four.things]
    assert comics.describe(four) == f"{names[0]}, {names[1]}, {names[2]} and {names[3]}"


def test_well_formed_narration():
    assert well_formed("a red circle, then a blue square, then a black cross")
    assert well_formed("a red circle, then a blue sq")  # cut off by the token limit
    assert not well_formed("a orange orange orange purple purple")
    assert not well_formed("a red circle, then, then a blue square")
    assert not well_formed("")


def test_pope_questions_and_scores():
    scenes = [comics.make_scene(7 * 10**9 + i) for i in range(30)]
    qs = pope_questions(scenes, seed=0)
    assert len(qs) == 30 * 6
    for sc, kind, q, truth in qs:
        present = {f"{t.colour} {t.shape}" for t in sc.things}
        named = q[len("Is there a ") : -1]
        assert (named in present) == (truth == "yes"), (kind, q)
        if kind == "adversarial" and truth == "no":
            c, s = named.split()
            assert any(c == p.split()[0] or s == p.split()[1] for p in present)
    r = _pope_scores([("yes", "yes"), ("yes", "no"), ("no", "yes"), ("no", "no"), ("no", "no")])
    assert (r["precision"], r["recall"]) == (0.5, 0.5) and r["f1"] == pytest.approx(0.5)
    assert r["yes_ratio"] == pytest.approx(0.4) and r["accuracy"]["mean"] == pytest.approx(0.6)


def test_eval_end_to_end_on_three_strips(organism, tmp_path):
    r = run_cli(
        "eval",
        "narration,vqa,box,dynamic,pope",
        "-m",
        organism[0],
        "--mmproj",
        organism[1],
        "--heads",
        "all",
        "--n-strips",
        "3",
        "-t",
        "2",
        "-o",
        str(tmp_path),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    for exp in ("narration", "vqa", "box"):
        acc = rep[exp]["all"]["accuracy"]
        assert 0 <= acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1] <= 1
    assert set(rep["dynamic"]) == {"all"}
    assert set(rep["dynamic"]["all"]) == {
        "segment_accuracy",
        "spearman",
        "well_formed",
        "stutter",
        "staircases",
    }
    assert set(rep["pope"]) == {"unsteered", "image-boost"}
    assert set(rep["pope"]["unsteered"]) == {"random", "popular", "adversarial"}
    assert rep["box"]["all"]["n"] >= 3  # 3 scenes of 2-4 objects, the first one skipped
    assert (tmp_path / "narration.png").exists() and (tmp_path / "dynamic_staircase_0.png").exists()
