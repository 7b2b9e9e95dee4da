"""Defenses, found by name: what the benchmark compares and ``trigger.sh`` runs; one module per method.

``base`` (objectives, defenses, the cleaning job, the registries), ``finetune`` (``FineTune`` and the
``defense`` decorator), then one module per defense: ``clip`` (``ft``), ``par``, ``cleanclip``,
``roclip``, ``adversarial`` (``fare``, ``tecoa``), ``eftclip`` (with its detection and oracles), ``invert``
(``invert``, ``par+invert``: unlearn the trigger a scan found).

A new defense is one class and one decorator, here or in a plugin (``par.plugins``)::

    from par.defenses import Objective, defense

    @defense("my_defense")
    class MyObjective(Objective):
        def __call__(self, model, batch):
            ...
            return {"loss": loss}

It is then found by ``python -m par clean --defense my_defense``, the benchmark and its tables.
"""
from par.defenses.base import (DEFENSES, OBJECTIVES, Batch, CleaningJob, Defense, MultiStageDefense,  # noqa: F401
                               Objective, ObjectiveParams, TaskContext, clean, make_objective, objective_params)
from par.defenses.finetune import FineTune, defense  # noqa: F401
from par.defenses import clip, par, cleanclip, roclip, adversarial, eftclip, invert  # noqa: F401,E402  (registration, in this order)
from par.defenses.eftclip import EftCLIP, EftCLIPParams  # noqa: F401,E402

__all__ = ["DEFENSES", "OBJECTIVES", "Batch", "CleaningJob", "Defense", "EftCLIP", "EftCLIPParams", "FineTune",
           "MultiStageDefense", "Objective", "ObjectiveParams", "TaskContext", "clean", "defense", "make_objective",
           "objective_params"]
