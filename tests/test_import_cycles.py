"""No two modules of a package import each other (lazily or not)."""

from __future__ import annotations

import itertools

import pytest

grimp = pytest.importorskip("grimp")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("napari_medseg")


@pytest.mark.parametrize("package", ["napari_medseg.models", "napari_medseg._napari",
                                     "napari_medseg.core"])
def test_no_mutual_imports(graph, package):
    modules = sorted(m for m in graph.modules if m.startswith(package + "."))
    mutual = [(a, b) for a, b in itertools.combinations(modules, 2)
              if graph.direct_import_exists(importer=a, imported=b)
              and graph.direct_import_exists(importer=b, imported=a)]
    assert mutual == []


def test_the_two_model_cycles_are_gone(graph):
    for a, b in (("napari_medseg.models.bundle", "napari_medseg.models.loaders"),
                 ("napari_medseg.models.deepbet", "napari_medseg.models.registry")):
        assert not graph.direct_import_exists(importer=a, imported=b)
