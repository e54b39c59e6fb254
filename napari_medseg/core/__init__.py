"""Plain numpy / scipy / torch code: no napari, no Qt."""

from .volume import Volume, affine_from_itk, itk_from_affine, make_affine, same_grid

__all__ = ["Volume", "affine_from_itk", "itk_from_affine", "make_affine", "same_grid"]
