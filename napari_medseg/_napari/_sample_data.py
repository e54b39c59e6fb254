"""npe2 sample-data contributions: File > Open Sample > napari-medseg."""

from __future__ import annotations

from ..data import SAMPLES, load_sample
from .boundary import volume_to_layer_data

__all__ = ["abdomen_ct", "head_mr", "sample_layers"]

# Display settings that make each sample look like its modality on a scanner console.
_IMAGE_KWARGS = {
    "abdomen-ct": {"contrast_limits": (-160.0, 240.0), "colormap": "gray"},  # abdomen window
    "head-mr": {"contrast_limits": (0.0, 1000.0), "colormap": "gray"},
}
_LABEL_KWARGS = {"opacity": 0.45}


def sample_layers(key: str) -> list[tuple]:
    """``[image, labels]`` napari LayerDataTuples of sample ``key``.

    Uses the files shipped in the package (or generates the identical phantom
    when they are missing).
    """
    img, lab = load_sample(key)
    title = SAMPLES[key].title
    return [
        volume_to_layer_data(img, name=title, **_IMAGE_KWARGS.get(key, {})),
        volume_to_layer_data(lab, name=f"{title} labels", **_LABEL_KWARGS),
    ]


def abdomen_ct() -> list[tuple]:
    """Synthetic abdomen CT (HU) with liver, spleen, kidney and lesion labels."""
    return sample_layers("abdomen-ct")


def head_mr() -> list[tuple]:
    """Synthetic T1-weighted head MR with CSF, gray/white matter and lesion labels."""
    return sample_layers("head-mr")
