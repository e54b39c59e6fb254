"""napari-medseg training."""
