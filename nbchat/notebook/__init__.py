"""The notebook surface of nbchat: the ``%%chat`` / ``%chat`` magics (magics.py) with their options
(options.py), the tools and first request of a turn (tool_loop.py; the turn runs in nbchat.turns),
the cell's result (reply.py), the chat panel widget (panel.py, with panel.js/panel.css; its
transcript and streaming view in panel_view.py, its Markdown in markup.py), the engines shared in
the kernel (engines.py), the cell grammar (cells.py), the streaming display (render.py) and the
teaching views (views.py draws them, teaching.py runs them).
Nothing here imports JAX; the engine is loaded on the first chat through ``nbchat.api``.
"""
