"""A training run: its plan made once before any work (`plan`), the loop and its state (`trainer`), the step in each
compile mode with the device settings and random streams (`engine`), checkpoints (`checkpoint`), the run directory
(`rundir`), progress bars and signals (`progress`), and the callbacks that watch a run (`tensorboard`, `tracking`,
`snr`)."""
