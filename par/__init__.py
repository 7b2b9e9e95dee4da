"""par: find and remove backdoors in CLIP models with Perturb and Recover (PAR).

Importing ``par`` does nothing but define names; submodules (``par.triggers``,
``par.models``, ``par.losses``, ...) are imported on demand so that the CLI
starts fast and the library has no import-time side effects.
"""
from par.errors import ParError

__version__ = "0.1.0"
__all__ = ["ParError", "__version__"]
