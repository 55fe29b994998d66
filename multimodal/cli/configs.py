"""The config files and YAML values `multimodal train` and `demo` read, bounded before they are read.

jsonargparse reads a config named anywhere (`--config`, a section's `--data FILE`, a file a config names,
a callback's) and parses YAML with aliases, so that 900 bytes of anchors each aliasing the one before nine
times (a "billion laughs") stand for 3 billion strings, and a named pipe given as a config is read forever.
`check_arguments` checks the command line before the parser reads any of it, and `_load_config`, the YAML
loader of jsonargparse in this process, each text it loads and the files that text names: only regular
files, at most MULTIMODAL_MAX_CONFIG_BYTES (1 MiB) each, nested at most MAX_DEPTH deep, whose aliases
expand to no more values than a config of that size could hold written out.
"""

import os
import stat
from pathlib import Path

import yaml
from jsonargparse import get_loader, set_loader
from jsonargparse._util import config_load_stack  # private: the files jsonargparse is reading (4.53.0, pinned)

from multimodal import userfiles
from multimodal.errors import UserError
from multimodal.userfiles import CONFIG_BYTES, reading

MAX_DEPTH = 100  # levels of nesting: a config has a few; jsonargparse and Python recurse about 1000 deep
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".jsonnet")
CONFIG_OPTIONS = ("--config", "-c", "--model", "--data", "--trainer", "--optimizer", "--lr_scheduler")


def config_limit() -> int:
    """The most bytes a config file may hold, and the most values its YAML may expand to."""
    return userfiles.limit(CONFIG_BYTES)


def check_file(path: str, config: bool = True) -> None:
    """Before `path`, an existing path, is read: a folder, or a regular file (a pipe's read never returns,
    /dev/zero's never ends) and, if it is a `config`, one within the size limit."""
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        return
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path} is not a regular file (a pipe, a device or a socket): give a file.")
    limit = config_limit()
    if config and info.st_size > limit:
        raise UserError(f"{path} is {info.st_size} bytes, over the limit of {limit} bytes for a config (set "
                        f"{CONFIG_BYTES} to raise it).")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _expanded_size(root: yaml.Node, limit: int) -> int | None:
    """The values `root` stands for with every alias written out, counted to just past `limit`, walking each
    node once; None when an alias sits inside the anchor it refers to (no end to writing it out); -1 when
    it nests deeper than MAX_DEPTH."""
    sizes: dict[int, int] = {}
    stack, open_nodes = [(root, False, 1)], set()
    while stack:
        node, children_done, level = stack.pop()
        if level > MAX_DEPTH:
            return -1
        if children_done:
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in _children(node)))
            open_nodes.discard(id(node))
        elif id(node) in open_nodes:  # still being counted: `node` contains itself
            return None
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True, level))
            stack.extend((c, False, level + 1) for c in _children(node))
    return sizes[id(root)]


def check_yaml(text: str, where: str) -> None:
    """`text` (a config file's, or a value's: `where` names it) within the size limit, nested at most
    MAX_DEPTH deep, with no alias that expands it past as many values as the limit's bytes could hold
    written out (a "billion laughs": 900 bytes, 3 billion strings); composed without building any value."""
    limit = config_limit()
    if len(text) > limit:
        raise UserError(f"{where} is {len(text)} bytes, over the limit of {limit} bytes for a config (set "
                        f"{CONFIG_BYTES} to raise it).")
    try:
        root = yaml.compose(text, Loader=yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return  # not YAML (or nested deeper than the pure-Python composer reads): the parser says what is wrong
    if root is None:
        return
    size = _expanded_size(root, limit)
    if size == -1:
        raise UserError(f"{where} nests its values more than {MAX_DEPTH} levels deep: a config needs a few.")
    if size is None:
        raise UserError(f"{where} holds an alias inside the anchor it refers to, which never ends when written "
                        "out: write the values out.")
    if size > limit:
        raise UserError(f"{where} expands through its YAML aliases (*name) to over {limit} values, more than a "
                        f"config of {limit} bytes could hold: write the values out, or set {CONFIG_BYTES} "
                        "to raise the limit.")


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [s for item in items for s in _strings(item)]


def _load_config(text: str):
    """jsonargparse's YAML loader for each config file and value it reads, after `check_yaml`; the files
    the loaded config names (a section's config, a callback's) checked before the parser reads them."""
    loading = config_load_stack.get()
    check_yaml(text, loading[-1][1] if loading else "A YAML value")
    value = _load_yaml(text)
    for string in _strings(value):
        if len(string) < 4096 and os.path.exists(string):
            check_file(string, config=string.lower().endswith(CONFIG_SUFFIXES))
    return value


_load_yaml = get_loader("yaml")  # jsonargparse's own; every YAML it loads in this process goes through the checks
set_loader("yaml", _load_config, (yaml.YAMLError,))


def _values(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) for each value on a command line: `--option value` and `--option=value`."""
    pairs, option = [], ""
    for arg in argv:
        if arg.startswith("--") or arg in ("-c", "-h"):
            option, eq, value = arg.partition("=")
            if eq:
                pairs.append((option, value))
        else:
            pairs.append((option, arg))
    return pairs


def check_arguments(argv: list[str]) -> None:
    """`train`'s arguments before the parser reads any: the files they name are regular files, configs
    within the size limit, and YAML values and configs without alias bombs."""
    for option, value in _values(argv):
        if len(value) < 4096 and os.path.exists(value):
            config = option in CONFIG_OPTIONS or value.lower().endswith(CONFIG_SUFFIXES)
            check_file(value, config)
            if config and os.path.isfile(value):
                with reading(value):
                    check_yaml(Path(value).read_text(encoding="utf-8-sig"), value)
        else:
            check_yaml(value, f"The value of {option or 'an argument'}")
