"""A training run: its plan made once before any work (`plan`), the loop and its state (`trainer`), the step in each
compile mode with its random streams (`engine`), the device's settings (`device`), checkpoints (`checkpoint`), the
run directory (`rundir`), the progress bars and epoch line (`progress`), and the callbacks that watch a run
(`tensorboard`, `tracking`, `snr`)."""
