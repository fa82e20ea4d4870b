"""Glue for training frameworks that look optimizers up by name (``lionopt.integrations.timm``).

Frameworks that take an optimizer instance or class (HF ``Trainer``, Lightning, Accelerate)
need no glue: see the README's "Using lionopt with ..." sections. Nothing here is imported by
``import lionopt``; each submodule imports its framework only when called.
"""
