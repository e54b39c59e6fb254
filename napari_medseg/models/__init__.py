"""napari-medseg models."""
