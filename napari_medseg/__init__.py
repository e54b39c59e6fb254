"""napari-medseg: deep-learning segmentation of 3D medical volumes in napari.

Importing this package is cheap: it does not import torch, napari or Qt.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
