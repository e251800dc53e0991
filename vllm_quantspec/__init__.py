"""vllm-quantspec: QuantSpec self-speculative decoding as a vLLM 0.26 plugin.

vLLM calls ``register()`` through the ``vllm.general_plugins`` entry point in every process it
starts (API server, engine core, workers), so everything the plugin changes in vLLM happens there.
"""

import multiprocessing
import os

__version__ = "0.1.0"

_registered_pid: int | None = None


def register() -> None:
    """Entry point of the plugin: check the vLLM version and apply every patch (idempotent)."""
    global _registered_pid
    from vllm_quantspec.patches import apply_all

    apply_all()  # raises on an unsupported vLLM, before anything else changes
    if _registered_pid != os.getpid():
        _registered_pid = os.getpid()
        # One line per process, so a log shows that every vLLM process loaded the plugin.
        from vllm.logger import init_logger

        init_logger("vllm.plugins.quantspec").info("vllm-quantspec %s registered in %s (pid %d)", __version__,
                    multiprocessing.current_process().name, os.getpid())
        probe = os.environ.get("QUANTSPEC_REGISTER_LOG")
        if probe:  # tests read this file to see which processes loaded the plugin
            with open(probe, "a") as f:
                f.write(f"{os.getpid()} {multiprocessing.current_process().name}\n")
