"""The settings of every command: the typed schema and each setting's one range check (`config`), the checks that
look beyond the values (`checks`: devices, files, a checkpoint), keys outside the schema (`schema`), YAML files named
on the command line (`config_files`), and `python train.py --help` (`usage`)."""
