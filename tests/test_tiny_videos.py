"""`build_tiny_dataset(use_videos=True)`: the tiny world's camera as MP4 video (what `bench-train`'s sides decode),
the same frames otherwise; the default stays PNG frames."""

from __future__ import annotations

import numpy as np
import torch

from reflowpairs.tiny.world import TINY_REPO_ID, TinyDatasetSpec, build_tiny_dataset

SPEC = TinyDatasetSpec(num_episodes=2, episode_length=6)


def test_a_tiny_dataset_with_videos_decodes_the_same_frames(tmp_path):
    video = build_tiny_dataset(tmp_path / "video", TINY_REPO_ID, SPEC, use_videos=True)
    png = build_tiny_dataset(tmp_path / "png", TINY_REPO_ID, SPEC)
    assert video.meta.video_keys == ["observation.images.cam"] and png.meta.video_keys == []
    assert list((tmp_path / "video" / "videos").rglob("*.mp4")) and not (tmp_path / "png" / "videos").exists()
    assert len(video) == len(png) == 12
    for i in (0, 7, 11):
        a, b = video[i], png[i]
        for key in ("observation.state", "action", "index", "episode_index"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        assert a["task"] == b["task"]
        frame, image = a["observation.images.cam"], b["observation.images.cam"]
        assert frame.shape == image.shape and frame.dtype == image.dtype == torch.float32
        # lossy video: close to the PNG frame on average, never exact
        assert float((frame - image).abs().mean()) < 0.1, i
    assert np.isclose(video.meta.fps, png.meta.fps)
