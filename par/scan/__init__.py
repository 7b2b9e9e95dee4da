"""Is a checkpoint backdoored? Scanners, found by name (``SCANNERS``); one module per scanner.

``base`` (the registry, what a scanner is given and returns), ``images`` (the shadow images),
``run`` (``ScanConfig``, ``scan_checkpoint``), then the scanners: ``inversion`` (``label-inversion``,
zero-shot per-label trigger inversion, the default), ``decree`` (DECREE, label-free) and ``decree-text``
(DECREE's trigger judged by where it collapses the images, against the label texts) and
``compactness`` (``patch-compactness``, each label's smallest patch trigger judged by its shape). A new scanner
is one class and one registration (see ``base``), here or in a plugin.
"""
from par.scan.base import (SCANNERS, InvertedTrigger, ScanContext, ScannerParams, ScanResult, Scanner,  # noqa: F401
                           make_scanner, mask_place, robust_z)
from par.scan import inversion, decree, decree_text, compactness  # noqa: F401,E402  (registration)
from par.scan.run import ScanConfig, check, scan_checkpoint, scan_request, trigger_toward  # noqa: F401,E402

__all__ = ["SCANNERS", "InvertedTrigger", "ScanConfig", "ScanContext", "ScanResult", "Scanner", "ScannerParams",
           "check", "make_scanner", "mask_place", "robust_z", "scan_checkpoint", "scan_request", "trigger_toward"]
