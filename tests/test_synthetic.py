"""The demo's compositional scenes: every factor value is drawn, visible and told apart."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipelines.synthetic import SCENE_SHAPES, SceneFactors, draw_scene, make_scenes, scene_captions


def test_every_shape_draws_its_own_picture_inside_the_image():
    factors = SceneFactors(shapes=SCENE_SHAPES)
    pictures = {}
    for shape in SCENE_SHAPES:
        img = np.asarray(
            draw_scene(shape, "red", "top left", "white", factors=factors, rng=random.Random(0))
        )
        painted = (img != np.asarray((245, 245, 245), dtype=np.uint8)).any(axis=-1)
        assert 20 <= painted.sum() < 0.5 * painted.size, shape  # visible, not the whole image
        ys, xs = np.nonzero(painted)
        assert ys.mean() < 16 and xs.mean() < 16, shape  # where the caption says
        pictures[shape] = painted
    for a in SCENE_SHAPES:
        for b in SCENE_SHAPES:
            if a < b:
                assert (pictures[a] != pictures[b]).sum() >= 10, (a, b)


def test_scenes_cover_every_caption_and_are_reproducible():
    factors = SceneFactors()
    scenes = make_scenes(3000, seed=0, factors=factors)
    assert {c for _, _, c in scenes} == set(scene_captions(factors))
    assert len(scene_captions(factors)) == factors.num_captions == 192
    assert make_scenes(20, seed=4) == make_scenes(20, seed=4)


def test_unknown_factor_values_are_refused():
    with pytest.raises(ValueError, match="shapes"):
        SceneFactors(shapes=("hexagon",))
    with pytest.raises(ValueError, match="scale"):
        SceneFactors(scale=0.9)
