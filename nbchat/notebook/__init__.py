"""The notebook surface of nbchat: the ``%%chat`` / ``%chat`` magics (magics.py), the cell grammar
(cells.py) and the streaming display (render.py). Nothing here imports JAX; the engine is loaded on
the first chat through ``nbchat.api``.
"""
