"""Unlearning methods: one file per method, all registered in :data:`METHODS`."""

import importlib

from scar.methods.base import (
    METHODS,
    Method,
    UnlearnData,
    access_profile,
    build_method,
    register,
)

#: Modules whose import registers a method (one file per method).
METHOD_MODULES = (
    "scar_method",
    "self_forget",
    "finetune",
    "negative_gradient",
    "random_labels",
    "duck",
    "retrain",
    "boundary_shrink",
    "boundary_expand",
    "jit",
    "ssd",
    "scrub",
    "bad_teacher",
    "salun",
    "l1_sparse",
    "unsir",
)
for _name in METHOD_MODULES:
    importlib.import_module(f"scar.methods.{_name}")

__all__ = ["METHODS", "Method", "UnlearnData", "access_profile", "build_method", "register"]
