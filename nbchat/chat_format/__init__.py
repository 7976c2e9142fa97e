"""Model-family tool-call formats, one module per format (``hermes``: the Hermes/Qwen ``<tool_call>``
tags). A format holds its tags, its streaming parser, how calls and results are written into a prompt
and the grammar that makes a reply follow it; nothing else."""
