"""Feature-level sites: subspaces of a site's activation that experiments read and write.

- :mod:`mi_spec.features.subspace`: :class:`Subspace`, :class:`LinearSubspace` (an orthonormal
  basis), :class:`SaeFeatures` (features of a sparse autoencoder, reconstruction error kept).
- :mod:`mi_spec.features.basis`: direction / basis files and DAS rotation blocks as bases
  (imported on its own: it reads rotations through the execute layer).
- :mod:`mi_spec.features.sae`: SAEs in the SAELens layout: load, save, train, hook -> site.
"""

from mi_spec.features.sae import Sae, load_sae, sae_site, save_sae, train_sae
from mi_spec.features.subspace import LinearSubspace, SaeFeatures, Subspace, full_space

__all__ = [
    "LinearSubspace",
    "Sae",
    "SaeFeatures",
    "Subspace",
    "full_space",
    "load_sae",
    "sae_site",
    "save_sae",
    "train_sae",
]
