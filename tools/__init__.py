"""Scripts built on the top-level modules: the study tables (ablate.sh), the GPU check's helpers
(gpu_check.sh), the peer and GPU benchmarks. Each runs as `python tools/<name>.py ...` from any folder."""
