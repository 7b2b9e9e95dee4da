"""The attacks' former import path, kept for plugins: ``par.triggers.TRIGGERS`` is ``par.attacks.TRIGGERS``."""
from par.attacks import (TRIGGERS, AttackContext, Trigger, apply, check_images, default_patch_size,  # noqa: F401
                         get_trigger, pattern_generator, place_patches, random_stripes, row_seed)
from par.attacks.blend import FONT, Blended, BlendedStripes, BlendedText, BlendedTriangles  # noqa: F401
from par.attacks.patch import BadNet, BadNetStripes  # noqa: F401
from par.attacks.wanet import WaNet  # noqa: F401
