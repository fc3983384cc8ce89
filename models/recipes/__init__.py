"""Recipe that builds the ``t1w-to-t2w-lite`` reference bundle.

One module per step, run in order by ``models/Makefile``:
simulate -> train -> export -> quantize -> evaluate -> build_bundle.
"""
