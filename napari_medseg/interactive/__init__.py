"""napari-medseg interactive."""
