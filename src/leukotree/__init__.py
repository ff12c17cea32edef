"""leukotree: hierarchical leukemia classification from blood smear images."""

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy, builtin_taxonomies, load_taxonomy

__version__ = "0.1.0"

__all__ = ["LeukotreeError", "Taxonomy", "__version__", "builtin_taxonomies", "load_taxonomy"]
