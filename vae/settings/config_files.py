"""Config files named on the command line (`--config-dir`, `--config-path`, `--config-name`), checked before Hydra
reads them.

Hydra loads them with a safe YAML loader, so a `!!python/...` tag cannot run code, but it fails with a 60-line
traceback; and a file whose aliases nest (a "billion laughs" file of a few lines) expands to millions of values
that Hydra builds one by one, for minutes, until memory runs out. Both are refused here in one line. What a
well-formed config can do is another matter (docs/robustness.md: it is code you run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import yaml

from vae.common.errors import UserError, exit_with

MAX_VALUES = 100_000  # values a config file may expand to (ours hold a few hundred)
PYTHON_TAG = "tag:yaml.org,2002:python/"


def problem(path: Path) -> Optional[str]:
    """What is wrong with the YAML file `path` (None if nothing): a Python tag, or aliases that expand too far."""
    sizes = {}

    def size(node) -> int:
        """Values under `node` once every alias is expanded (a shared node counts at each use, is walked once)."""
        if id(node) not in sizes:
            if node.tag.startswith(PYTHON_TAG):
                raise ValueError(f"line {node.start_mark.line + 1} asks for a Python object "
                                 f"({node.tag[len(PYTHON_TAG) - len('python/'):]})")
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    try:
        with open(path, "rb") as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
        values = 0 if root is None else size(root)
    except (OSError, yaml.YAMLError):
        return None  # unreadable or malformed: Hydra says so in its own (short) message
    except RecursionError:
        return "it nests too deeply"
    except ValueError as e:
        return str(e)
    if values > MAX_VALUES:
        return f"its aliases expand to {values:,} values, more than the {MAX_VALUES:,} a config may hold"
    return None


def named_files(argv: List[str], app_dir: Path) -> Iterator[Path]:
    """Every YAML file under the config directories the command line names (`--config-dir`, `--config-path`, and the
    `--config-name` file itself where it is a path)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    args, _ = parser.parse_known_args(argv)
    dirs = [Path(d).expanduser() for d in (args.config_dir,) if d]
    if args.config_path:
        dirs.append(app_dir / Path(args.config_path).expanduser())  # Hydra: relative to the application's file
    name = args.config_name
    if name:  # the named file first (`train.py -cn x`: x.yaml in a config directory), so that it is the one reported
        yield from (f for f in (*(d / f"{name}.yaml" for d in dirs), Path(name)) if f.suffix == ".yaml" and f.is_file())
    for d in dirs:
        if d.is_dir():
            yield from sorted(d.rglob("*.yaml"))  # the groups its defaults list may name


def check_config_files(app_file: str, argv: Optional[List[str]] = None) -> None:
    """Refuse, in one line and before Hydra starts, a config file from the command line that Hydra would turn into a
    traceback or an endless load. Call it from the `if __name__ == "__main__":` block, before `main()`."""
    for path in named_files(sys.argv[1:] if argv is None else argv, Path(app_file).resolve().parent):
        found = problem(path)
        if found:
            exit_with(UserError(f"config file {path}: {found}; Hydra was not started (fix or remove the file)"))
