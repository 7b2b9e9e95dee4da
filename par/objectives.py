"""The objectives' former import path, kept for plugins: ``par.objectives.OBJECTIVES`` is
``par.defenses.OBJECTIVES`` (each objective now lives with its defense in ``par.defenses``)."""
from par.defenses import OBJECTIVES, Batch, Objective, ObjectiveParams, TaskContext, make_objective, objective_params  # noqa: F401
from par.defenses.adversarial import (AdversarialObjective, AdversarialParams, FAREObjective, FAREParams,  # noqa: F401
                                      ImageTower, TeCoAObjective, TeCoAParams, unwrapped)
from par.defenses.cleanclip import CleanCLIPObjective, CleanCLIPParams  # noqa: F401
from par.defenses.clip import ClipObjective  # noqa: F401
from par.defenses.par import PARObjective, PARParams  # noqa: F401
from par.defenses.roclip import RoCLIPObjective, RoCLIPParams, nearest_captions  # noqa: F401
