"""Beyond one host: which sources belong together, so KSM saves the most.

- :mod:`.sketch`: a small mergeable summary of a source's pages, and the savings of
  any group of sources estimated from their sketches (with a standard error);
  :mod:`.fileformat`: the versioned sketch file.
- :mod:`.synth`: synthetic fleets of known structure; :mod:`.sources`: how a worker
  opens a source.
- :mod:`.place`: the placement on hosts; :mod:`.exact`: the engine's exact figures for
  a host; :mod:`.cluster`: both as Dask tasks; :mod:`.commands`: ``ksmcore sketch``
  and ``ksmcore fleet``.
"""

from __future__ import annotations

from .fileformat import load, save
from .sketch import Estimate, Sketch, estimate, merge, sketch_hashes, sketch_pages
from .sources import open_source


def sketch_source(spec: str, **params: int) -> Sketch:
    """The sketch of one source (a memory image or core path, or a ``synth:`` member),
    read here."""
    src = open_source(spec)
    return sketch_pages(src.segments, src.name, spec, src.kind, **params)


__all__ = ["Estimate", "Sketch", "estimate", "load", "merge", "open_source", "save",
           "sketch_hashes", "sketch_pages", "sketch_source"]
