"""The notebook surface of nbchat: the ``%%chat`` / ``%chat`` magics (magics.py) with their options
(options.py), the tool loop of an exchange (tool_loop.py), the streamed reply and its result
(reply.py), the engines shared in the kernel (engines.py), the cell grammar (cells.py), the
streaming display (render.py) and the teaching views (views.py draws them, teaching.py runs them).
Nothing here imports JAX; the engine is loaded on the first chat through ``nbchat.api``.
"""
