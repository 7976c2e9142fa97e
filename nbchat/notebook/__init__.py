"""The notebook surface of nbchat: the ``%%chat`` / ``%chat`` magics (magics.py) with their options
(options.py), the tool loop of an exchange (tool_loop.py), the streamed reply and its result
(reply.py), the engines shared in the kernel (engines.py), the cell grammar (cells.py) and the
streaming display (render.py). Nothing here imports JAX; the engine is loaded on the first chat
through ``nbchat.api``.
"""
