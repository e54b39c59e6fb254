"""napari-medseg _widgets."""
