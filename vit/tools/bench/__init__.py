"""``fastvit bench``: settings, providers (what is run), parity, timing, report, and the job (``run``)."""

from .parity import FP32_RTOL, Reference, check_parity, compare, reference_outputs, tolerance
from .providers import (
                        Provider,
                        default_providers,
                        get_provider,
                        provider_names,
                        register_provider,
                        unavailable_reason,
                        unregister_provider,
)
from .report import cpu_line, environment, format_table, plot, write
from .run import failed, main, run
from .settings import CPU_BATCH, CPU_MODEL, CUDA_BATCH, CUDA_MODEL, DTYPES, Settings, make_settings
from .timing import (
    PeakMemory,
    inference_step,
    ratio_spread,
    release_memory,
    sync,
    time_interleaved,
    time_steps,
    train_step,
)

__all__ = ["CPU_BATCH", "CPU_MODEL", "CUDA_BATCH", "CUDA_MODEL", "DTYPES", "FP32_RTOL", "PeakMemory",
           "Provider", "Reference", "Settings", "check_parity", "compare", "cpu_line", "default_providers",
           "environment", "failed", "format_table", "get_provider", "inference_step", "main",
           "make_settings", "plot", "provider_names", "ratio_spread", "reference_outputs", "register_provider",
           "release_memory", "run", "sync", "time_interleaved", "time_steps", "tolerance", "train_step",
           "unavailable_reason", "unregister_provider", "write"]
