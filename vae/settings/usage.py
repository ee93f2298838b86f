"""`python train.py --help`: a page built from what already describes the settings, so that it cannot drift.

- the settings, their values and meaning: configs/config.yaml, its keys, inline comments and section comments (the
  values are those of the composed config, so `python train.py experiment=paper --help` shows the preset's);
- the config groups: config.yaml's defaults list (with its comments) and the files of each group's folder, each
  described by its first comment line;
- the other commands: every module of vae/ that runs with `python -m`, described by its docstring's first sentence;
- the examples: train.py's own docstring.

Hydra prints it through `hydra.help.template` (configs/hydra/help/train.yaml, resolver `train_help` in
vae/settings/config.py); `--hydra-help` stays Hydra's. Nothing here imports torch or the modules it describes.
"""
from __future__ import annotations

import ast
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

REPO_DIR = Path(__file__).resolve().parents[2]
# A key line of the YAML: `  key: value   # comment` (the value holds no `#` in our configs).
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_]\w*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
COMMENT = re.compile(r"^(?P<indent> *)#\s?(?P<text>.*)$")
SKIPPED_BLOCKS = ("defaults", "hydra")  # not settings: the groups (listed apart) and Hydra's own
MAIN_GUARD = re.compile(r"""^if __name__ == ["']__main__["']:""", re.M)


@dataclass
class Setting:
    key: str
    value: str  # as config.yaml writes it
    meaning: str = ""


@dataclass
class Section:
    title: str
    settings: List[Setting] = field(default_factory=list)


def read_settings(text: str) -> List[Section]:
    """The settings of a config file, in its order, in sections: a comment at column 0 (after the file's header)
    titles the keys below it; a blank line before a key with no such comment starts an untitled one. A comment on
    its own line indented under a key continues that key's meaning; a mapping's keys are `mapping.key`."""
    sections: List[Section] = []
    title: List[str] = []
    parent: Optional[str] = None  # the mapping whose indented keys are being read (eval -> eval.iw_samples)
    skipping = False  # inside `defaults:` or `hydra:`
    last: Optional[Setting] = None  # the key a continuation comment belongs to
    seen_key = after_blank = after_title = False
    for line in text.splitlines():
        if not line.strip():
            last, after_blank, after_title = None, True, False
            continue
        comment = COMMENT.match(line)
        if comment:
            text_ = comment["text"].strip()
            if comment["indent"] and last is not None:
                last.meaning = f"{last.meaning} {text_}".strip()
            elif not comment["indent"] and seen_key:  # the file's own header comes before any key
                title = [*title, text_] if after_title else [text_]
                after_title = True
            continue
        key = KEY.match(line)
        after_title = False
        if key is None:  # a list item, or a value spread over lines: part of the block above
            continue
        seen_key = True
        if not key["indent"]:
            skipping = key["key"] in SKIPPED_BLOCKS
            parent = None if skipping or key["value"] else key["key"]
        if skipping or (not key["indent"] and parent is not None):  # a block opens: no setting on this line
            last = None
            if parent is not None:
                sections.append(Section(" ".join(title) or f"{parent}.*"))
                title, after_blank = [], False
            continue
        if title or after_blank or not sections:
            sections.append(Section(" ".join(title)))
            title, after_blank = [], False
        last = Setting(f"{parent}.{key['key']}" if key["indent"] and parent else key["key"], key["value"].strip(),
                       (key["comment"] or "").strip())
        sections[-1].settings.append(last)
    return [s for s in sections if s.settings]


def read_groups(text: str) -> List[Tuple[str, str, str]]:
    """(group, default option, comment) for each config group in a config file's defaults list."""
    groups, inside = [], False
    for line in text.splitlines():
        if not line.startswith((" ", "#")) and line.strip():
            inside = line.startswith("defaults:")
            continue
        item = re.match(r"^\s+-\s+(?P<group>[\w/]+):\s*(?P<option>[^#\s]*)\s*(?:#\s?(?P<comment>.*))?$", line)
        if inside and item and not item["group"].startswith(("override", "hydra")):
            groups.append((item["group"], item["option"], (item["comment"] or "").strip()))
    return groups


def first_comment(path: Path) -> str:
    """The first sentence of a config file's leading comment (`@package` lines and examples aside)."""
    kept = []
    for line in path.read_text().splitlines():
        comment = COMMENT.match(line)
        if comment is None or comment["indent"]:
            break
        text = comment["text"]
        if text.startswith("@package"):
            continue
        if not text.strip() or text.startswith(" "):  # a blank comment line or an indented example ends it
            break
        kept.append(text.strip())
        if text.rstrip().endswith(":"):  # what follows is a list or examples
            break
    return first_sentence("\n".join(kept)).rstrip(":")


def first_sentence(doc: str) -> str:
    """A docstring's first sentence, without a leading "`python -m ...`: " usage line."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    paragraph = re.sub(r"^`[^`]*`:\s*", "", paragraph)
    # A sentence ends at a full stop before a capital letter ("et al. 2017" does not end one).
    sentence = re.split(r"(?<=[.!?])(?<!\bal\.)\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]
    return sentence[:1].upper() + sentence[1:]


def commands(package: Path = REPO_DIR / "vae") -> List[Tuple[str, str]]:
    """(module, purpose) for every module under `package` that runs with `python -m`."""
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__main__.py":
            module = path.parent
        elif MAIN_GUARD.search(path.read_text()):
            module = path.with_suffix("")
        else:
            continue
        name = ".".join(module.relative_to(package.parent).parts)
        found.append((name, first_sentence(ast.get_docstring(ast.parse(path.read_text())) or "")))
    return found


def show(value: Any) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def _rows(rows: List[Tuple[str, str]], width: int, indent: int = 2, column: int = 30) -> List[str]:
    """`left  text` rows, the text wrapped under itself."""
    out = []
    for left, text in rows:
        head = " " * indent + left
        head = head.ljust(column) if len(head) < column - 1 else head + "\n" + " " * column
        if not text:
            out.append(head.rstrip())
            continue
        wrapped = textwrap.wrap(text, max(width - column, 30))
        out.append(head + ("\n" + " " * column).join(wrapped))
    return out


def _script_doc(script: Path) -> Tuple[str, List[str]]:
    """A script's docstring: its first line, and its indented example lines."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    lines = doc.splitlines()
    return (lines[0] if lines else ""), [line for line in lines if line.startswith("    ")]


def help_page(cfg=None, config_dir: Path = REPO_DIR / "configs", config_name: str = "config",
              script: Path = REPO_DIR / "train.py", width: Optional[int] = None) -> str:
    """The help page of `script` whose settings are `<config_dir>/<config_name>.yaml`; `cfg`: the composed config
    (its values are shown; None = the file's own)."""
    from omegaconf import OmegaConf

    width = width or max(80, min(shutil.get_terminal_size((110, 24)).columns, 120))
    text = (config_dir / f"{config_name}.yaml").read_text()
    title, examples = _script_doc(script)
    lines = [f"{script.name}: {title}", "", f"Usage: python {script.name} [key=value ...] [group=option ...]",
             *examples, ""]

    lines.append("== Settings (key=value: meaning; the defaults, or the values of overrides given before --help) ==")
    for section in read_settings(text):
        if section.title:
            lines.extend(textwrap.wrap(section.title, width))
        rows = []
        for s in section.settings:
            value = s.value
            if cfg is not None:
                found = OmegaConf.select(cfg, s.key, default=None, throw_on_missing=False)
                value = show(OmegaConf.to_container(found) if OmegaConf.is_config(found) else found)
            rows.append((f"{s.key}={value}", s.meaning))
        lines.extend(_rows(rows, width))
    lines.append("")

    lines.append("== Config groups (group=option; a group's own settings are group.key=value) ==")
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) if cfg is not None else None
    for group, default, comment in read_groups(text):
        chosen = (choices or {}).get(group, default)
        lines.extend(_rows([(f"{group}={show(chosen)}", comment)], width))
        options = sorted((config_dir / group).glob("*.yaml"))
        lines.extend(_rows([(p.stem, first_comment(p)) for p in options], width, indent=6))
    lines.append("")

    lines.append("== Other commands ==")
    lines.extend(_rows([(f"python -m {name}", purpose) for name, purpose in commands()], width))
    lines.append("")
    lines.append("== More ==")
    more = [(f"python {script.name} <overrides> --cfg job", "every setting, with its value after the overrides"),
            (f"python {script.name} -m key=a,b ...", "a sweep: one run per value (docs/sweeps.md)"),
            (f"python {script.name} --hydra-help", "Hydra's own options"),
            ("README.md, docs/", "the guides; docs/references.md: the papers behind the code")]
    lines.extend(_rows(more, width, column=44))
    return "\n".join(lines) + "\n"
