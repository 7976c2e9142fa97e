"""Process-wide JAX settings the engine needs: the persistent compilation cache.

Compiled programs are cached on disk so a new process (a restarted kernel, the next test run) loads
them instead of compiling again (measured on CPU: decode 0.85 -> 0.13 s, prefill 1.8 -> 0.12 s).
Cached executables depend on the CPU's features, so the directory is keyed per machine. A cache
directory the user configured themselves is left alone.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

_configured = False


def nbchat_home() -> Path:
    """nbchat's cache directory (``nbchat.models.cache_dir``: ``$NBCHAT_HOME`` or ``~/.cache/nbchat``)."""
    from nbchat.models import cache_dir

    return cache_dir()


def machine_key() -> str:
    """A short hash of what a compiled CPU executable depends on: OS, architecture, CPU flags and the
    jax/jaxlib versions."""
    import jax
    import jaxlib

    cpu_flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                cpu_flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        cpu_flags = platform.processor()
    parts = [platform.system(), platform.machine(), cpu_flags, jax.__version__, jaxlib.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def compilation_cache_dir() -> Path:
    return nbchat_home() / "jax-cache" / machine_key()


def enable_persistent_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at our per-machine directory (once per process) and
    cache every program however quick its compile. Returns the directory in use, or None when the
    user configured their own."""
    global _configured
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if _configured:
        return Path(jax.config.jax_compilation_cache_dir)
    if jax.config.jax_compilation_cache_dir:
        return None
    directory = compilation_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides whether to use the cache at its first compile; something may have compiled
    # before us (a jnp op while loading weights), so let it decide again.
    compilation_cache.reset_cache()
    _configured = True
    return directory
