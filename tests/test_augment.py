"""Training crops: inside the image, near its aspect ratio, in the configured area range, off in
evaluation, and the same crop again for the same generator (resume remakes images from it)."""

import math

import numpy as np
import pytest
from PIL import Image

from navit_clip.config import ConfigError, load_config
from navit_clip.data.augment import CropPolicy, crop_box, random_crop
from navit_clip.data.shards import Sample
from navit_clip.data.spec import evaluation_spec, stream_spec


@pytest.mark.parametrize("size", [(640, 480), (37, 300), (9, 9), (1, 50)])
@pytest.mark.parametrize("policy", [CropPolicy(0.5, 1.0), CropPolicy(0.8, 1.25), CropPolicy(1.0, 1.5)])
def test_crops_stay_inside_with_the_area_and_aspect_asked_for(size, policy):
    width, height = size
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = crop_box(width, height, policy, rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        if min(width, height) >= 30:  # rounding to whole pixels dominates on tiny images
            # one pixel of rounding on each side; a crop clipped to the image loses at most a
            # factor of the aspect change in area
            assert (w + 1) * (h + 1) >= policy.min_area * width * height / policy.max_aspect_change
            change = (w / h) / (width / height)
            assert 1 / policy.max_aspect_change - 0.05 <= change <= policy.max_aspect_change + 0.05


def test_crops_vary_and_cover_the_range():
    rng = np.random.default_rng(1)
    boxes = [crop_box(400, 100, CropPolicy(0.5, 1.0), rng) for _ in range(500)]
    areas = [(r - l) * (b - t) / 40_000 for l, t, r, b in boxes]
    assert min(areas) < 0.55 and max(areas) > 0.95
    assert len({(l, t) for l, t, _, _ in boxes}) > 100  # positions spread, not one corner


def test_same_generator_same_crop_and_off_is_identity():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    sample = Sample(key="k", image=image, caption="c", native_size=(180, 120))
    policy = CropPolicy(0.6, 1.3)
    a = random_crop(sample, policy, np.random.default_rng([7, 0, 0, 3, 11]))
    b = random_crop(sample, policy, np.random.default_rng([7, 0, 0, 3, 11]))
    assert a.image.size == b.image.size and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    # the cropped pixels are the original's pixels at the box
    box = crop_box(90, 60, policy, np.random.default_rng([7, 0, 0, 3, 11]))
    assert np.array_equal(np.asarray(a.image), np.asarray(image)[box[1]:box[3], box[0]:box[2]])
    # the native size (the file was twice as large) shrinks in proportion
    assert a.native_size == (round(180 * a.image.size[0] / 90), round(120 * a.image.size[1] / 60))
    assert random_crop(sample, CropPolicy(), np.random.default_rng(0)) is sample


def test_config_keys_reach_the_training_stream_only():
    cfg = load_config(overrides=["data.augment.min_area=0.7", "data.augment.max_aspect_change=1.2"])
    assert stream_spec(cfg).augment == CropPolicy(0.7, 1.2)
    assert not evaluation_spec(cfg).augment.active


@pytest.mark.parametrize("override", ["data.augment.min_area=0", "data.augment.min_area=1.5",
                                      "data.augment.max_aspect_change=0.9"])
def test_bad_values_name_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])


def test_log_uniform_aspect_change_is_symmetric():
    rng = np.random.default_rng(3)
    changes = []
    for _ in range(2000):
        l, t, r, b = crop_box(1000, 1000, CropPolicy(1.0, 2.0), rng)
        changes.append(math.log((r - l) / (b - t)))
    assert abs(np.mean(changes)) < 0.05  # as many wider crops as taller ones
