"""Attacks: the trigger algebra (``base``), one module per trigger family, and poisoning.

Importing the package registers every built-in trigger in ``TRIGGERS``, in the paper's order
(BadNet, BadNet-Stripes, Blended, Blended-Stripes, Blended-Triangles, Blended-Text, WaNet, BadCLIP).
A new trigger is a registered ``Trigger`` subclass, here or in a plugin (``par.plugins``).
"""
from par.attacks.base import (TRIGGERS, AttackContext, Trigger, apply, check_images, default_patch_size, get_trigger,
                              pattern_generator, place_patches, random_stripes, row_seed)
from par.attacks import patch, blend, wanet, badclip  # noqa: E402,F401  (registration, in this order)

__all__ = ["TRIGGERS", "AttackContext", "Trigger", "apply", "check_images", "default_patch_size", "get_trigger",
           "pattern_generator", "place_patches", "random_stripes", "row_seed"]
