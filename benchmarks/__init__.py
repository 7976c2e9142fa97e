"""Speed and memory benchmarks of nbchat (``python -m benchmarks.decode``); each prints a table and
writes JSON under benchmarks/results/."""
