"""ustc/video.py: uniform frame sampling and loading a real video (moved verbatim from
tests/test_models_llava_onevision.py)."""

import numpy as np
import pytest


# ------------------------------------------------- real-video loading (ustc/video.py)
def test_uniform_frame_sampling():
    from ustc.video import sample_frame_indices

    assert sample_frame_indices(20, 5) == [0, 4, 9, 14, 19]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 4)


def test_load_video_with_pyav_returns_the_sampled_frames(tmp_path):
    av = pytest.importorskip("av")
    from ustc.video import load_video

    path = tmp_path / "gray.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(20):  # frame i is a flat gray of level 10 * i
            image = np.full((32, 32, 3), 10 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    frames = load_video(path, num_frames=5, backend="pyav")
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    levels = frames.reshape(5, -1).mean(axis=1)
    assert np.abs(levels - 10 * np.array([0, 4, 9, 14, 19])).max() < 4
    with pytest.raises(ValueError, match="no video file"):
        load_video(tmp_path / "missing.mp4")
