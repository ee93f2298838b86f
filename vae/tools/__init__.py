"""The command-line tools' own parts, apart from the library: the benchmark's settings (`bench_config`), the
gradient diagnostics' statistics and report (`gradient_stats`, `gradient_report`), a sweep's start (`sweep_plan`),
mean ± std and the published numbers (`stats`), and the machine a figure was measured on (`machine`). The commands
themselves are the modules at the top of the package: `python -m vae.<command>`."""
