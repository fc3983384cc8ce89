"""Recipes that build the reference model bundles (``t1w-to-t2w-lite``, 2D, and
``t1w-to-t2w-full``, 2.5D; see ``config.MODELS``).

One module per step, run in order by ``models/Makefile`` (each takes ``--model NAME``):
simulate -> train -> export -> quantize -> export_tflite -> evaluate -> build_bundle.
"""
