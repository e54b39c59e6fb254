"""A classical prompt engine: no weights, any modality, fast on a CPU.

How it works (3D mode; 2D mode is the same on one slice):

1. A region of interest (at least ``roi_size`` voxels) is cut around the
   prompts and lightly smoothed (cached between clicks).
2. Intensity statistics of the object come from the prompts: a small
   neighbourhood of each positive click, the object scribble, the centre of a
   box (median and a robust spread, per seed, so an object of several
   intensities can be built from several clicks).
3. Seeded region growing: voxels within ``k`` spreads of a seed's statistics
   that are connected to that seed. The surroundings of the grown object (and
   any negative click, background scribble or box edge) give background
   statistics, and the object is re-grown with a likelihood test, which puts
   its edge half-way between object and background intensities.
   A later positive click inside a region of its own intensity (a kidney's
   cortex after a click on its medulla) adds that class to the whole object
   (a second pass then takes the background from around the grown object);
   a later click on a blurred edge (its intensity a blend of its
   neighbours') only adds voxels within ``edge_mm``.
4. A negative click removes only the connected region around it that is
   closer to its intensity than to the object's; its intensity is background
   everywhere only when it is no blend of object and background. Where the
   grown object still touches a background seed (two structures of the same
   intensity), a marker watershed on the gradient magnitude splits them at
   the strongest edge between the seeds (edge-aware propagation). A split
   from a click on an edge that would take more of the object than it leaves
   (a thin ribbon is all edge) takes only what lies near the click.
5. Holes are filled and everything outside a box is dropped. Thin bridges are
   cut only towards thick structures beyond them, so thin objects (a cortical
   ribbon) survive.

The first click's growth is kept between updates (``cache``): a later click
only pays for its own local growth, the negative prompts and the edges.

Modules: ``seeds`` (prompts as seed masks), ``statistics`` (object and
background intensity classes), ``growing`` (seeded region growing),
``negative`` (negative prompts), ``refine`` (edges and holes), ``cache``
(growths kept between updates) and ``engine`` (:class:`ClassicalEngine`,
which ties them together).
"""

from .engine import ClassicalEngine

__all__ = ["ClassicalEngine"]
